"""The TCP connections of this process's gloo group, and how to shut them down: the release of a rank blocked
in a collective, by the rank itself.

A rank whose peer is lost is released when its collective fails: gloo fails a ``recv`` at once when the
connection it waits on is closed. Dropping the group closes its connections — but only once nothing holds
the group any more, and a process that ever created a ``DTensor`` on it (every FSDP rank) keeps it alive
(in torch 2.13, a reference torch keeps outside Python: the group's threads and sockets outlive
``destroy_process_group`` until the process exits). So with FSDP a survivor's connections stayed open, and a
rank blocked on a survivor rather than on the lost rank (with 4 ranks and rank 1 lost, rank 3 waits on
rank 2) was never released: it was killed when the release window ran out, and replaced.

Here the sockets themselves are shut down. :meth:`GroupSockets.joining` records the sockets the group's
creation opened and keeps the group's connections: those accepted on its listening socket and those made to
the other ranks' listening sockets (whose ports the ranks exchange through the group's store). Never the
listening socket itself: gloo aborts the process when its ``accept`` fails. :meth:`GroupSockets.shutdown`
shuts them down (``SHUT_RDWR``, which ends the connection for every descriptor of it, gloo's included) — a
collective in flight on this rank fails with "Connection closed", and so do the peers' that wait on this
rank. It is safe from any thread, and against descriptors reused since: each is checked to be the same
socket (its inode) before it is touched.

Linux only (``/proc``); elsewhere, and for other backends (NCCL and HCCL abort their communicators instead),
nothing is recorded and a shutdown does nothing.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.distributed as dist

#: Where this process's descriptors and the kernel's TCP sockets are listed.
_FDS = "/proc/self/fd"
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"  # the state column of a listening socket in those tables
#: The store key under which each rank publishes its group's listening port.
_PORT_KEY = "group_sockets/listener/{rank}"


def _sockets() -> dict[int, int]:
    """This process's socket descriptors: fd → the socket's inode."""
    found: dict[int, int] = {}
    for name in os.listdir(_FDS):
        try:
            target = os.readlink(f"{_FDS}/{name}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            found[int(name)] = int(target[len("socket:[") : -1])
    return found


def _tcp_ports() -> dict[int, tuple[int, int, bool]]:
    """The kernel's TCP sockets of this network namespace: inode → (local port, remote port, listening)."""
    table: dict[int, tuple[int, int, bool]] = {}
    for path in _TCP_TABLES:
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], int(cols[9])
            table[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state == _LISTEN,
            )
    return table


@dataclass(frozen=True)
class GroupSockets:
    """The sockets of one incarnation of this process's group, as (fd, inode) pairs."""

    sockets: tuple[tuple[int, int], ...] = field(default=())

    @classmethod
    def joining(
        cls, create: Callable[[], object], store: dist.Store | None, rank: int, world_size: int
    ) -> GroupSockets:
        """Call ``create`` (which creates the default group through ``store``) and record the sockets it
        opened that are the group's. Every rank of the group calls this (it exchanges listening ports)."""
        if not sys.platform.startswith("linux") or store is None:
            create()
            return cls()
        before = _sockets()
        create()
        if dist.get_backend() != "gloo":
            return cls()
        opened = {fd: inode for fd, inode in _sockets().items() if before.get(fd) != inode}
        ports = _tcp_ports()
        listening = [ports[i][0] for i in opened.values() if i in ports and ports[i][2]]
        own = listening[0] if len(listening) == 1 else -1  # -1: none, or not only gloo's (kept apart)
        store.set(_PORT_KEY.format(rank=rank), str(own))  # the others wait for it, whatever it is
        if own == -1:
            return cls()
        peers = {int(store.get(_PORT_KEY.format(rank=r))) for r in range(world_size) if r != rank} - {-1}
        mine = tuple(
            (fd, inode)
            for fd, inode in sorted(opened.items())
            if inode in ports and not ports[inode][2] and (ports[inode][0] == own or ports[inode][1] in peers)
        )
        return cls(mine)

    def shutdown(self) -> int:
        """Shut down every socket recorded that is still open (the same socket: its inode checked); returns
        how many. Idempotent; any thread."""
        done = 0
        for fd, inode in self.sockets:
            try:
                dup = os.dup(fd)
            except OSError:  # closed since
                continue
            try:
                if os.fstat(dup).st_ino != inode:  # the descriptor was reused for another file
                    continue
                with socket.socket(fileno=dup) as sock:
                    dup = -1  # the socket object closes its descriptor
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                        done += 1
                    except OSError:  # not connected (any more)
                        pass
            finally:
                if dup != -1:
                    os.close(dup)
        return done
