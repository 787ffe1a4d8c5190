"""The release of a rank blocked in a gloo collective by shutting down the group's sockets
(:mod:`trainer.devices.group_sockets`), in real processes joined by gloo.

Each process creates a DTensor on the group first: from then on torch holds the group past
``destroy_process_group`` (the case FSDP ranks are in), so dropping the group no longer closes its
connections. Rank 1 then waits in a ``recv`` from rank 0, which is alive and never sends; the group's timeout
is 300 s, so without a shutdown rank 1 would still be waiting when the test gives up on it (60 s)."""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from trainer.devices.group_sockets import GroupSockets
from trainer.testing.s3 import free_port

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")

_WAIT_S = 60  # far below the group's timeout (300 s), far above a release (well under a second)


def _rank(rank: int, port: int, other_port: int, who: str, out: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))

    def create() -> None:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=300))
        # A connection the group's creation did not make, opened meanwhile (as another thread might): not
        # the group's, never shut down.
        create.unrelated = socket.create_connection(("127.0.0.1", other_port))  # type: ignore[attr-defined]

    sockets = GroupSockets.joining(create, store, rank, 2)
    unrelated = create.unrelated  # type: ignore[attr-defined]
    mesh = init_device_mesh("cpu", (2,))
    DTensor.from_local(torch.ones(2), mesh, [Shard(0)])  # torch holds the group from now on
    dist.barrier()
    if rank == 0:
        if who == "survivor":  # rank 0 drops the group, then shuts its connections down
            dist.destroy_process_group()
            shut = sockets.shutdown()
        else:  # rank 1 releases itself; rank 0 waits to be told how it ended
            shut = 0
        store.wait(["rank 1 done"])
        outcome = {"shut": shut, "recorded": len(sockets.sockets)}
    else:
        if who == "itself":  # from another thread, as WorkerActor.release answers while train() blocks
            threading.Timer(1.0, sockets.shutdown).start()
        started = time.monotonic()
        try:
            dist.recv(torch.zeros(1), src=0)
            error = ""
        except RuntimeError as exc:
            error = str(exc)
        outcome = {"error": error, "waited_s": time.monotonic() - started, "recorded": len(sockets.sockets)}
        store.set("rank 1 done", "1")
    unrelated.sendall(b"still open")  # the connection the group did not make still works (else EPIPE)
    outcome["unrelated_open"] = True
    torch.save(outcome, os.path.join(out, f"{rank}.pt"))


@pytest.mark.parametrize("who", ["survivor", "itself"])
def test_a_rank_blocked_on_a_live_peer_is_released_by_a_shutdown(who: str, tmp_path: Path) -> None:
    """``survivor``: the peer it waits on shuts its sockets down after dropping the group; ``itself``: the
    blocked rank shuts its own down from another thread."""
    server = socket.create_server(("127.0.0.1", 0), backlog=8)  # connections complete in its backlog
    try:
        context = mp.start_processes(
            _rank,
            args=(free_port(), server.getsockname()[1], who, str(tmp_path)),
            nprocs=2,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + _WAIT_S + 30
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"rank 1 was not released within {_WAIT_S} s ({who})")
    finally:
        server.close()
    first = torch.load(tmp_path / "0.pt", weights_only=True)
    second = torch.load(tmp_path / "1.pt", weights_only=True)
    # The group's connections of each rank: the one to the other rank (its listening socket is not one).
    assert first["recorded"] == second["recorded"] == 1
    assert "Connection closed" in second["error"] or "Connection reset" in second["error"], second["error"]
    assert second["waited_s"] < _WAIT_S
    if who == "survivor":
        assert first["shut"] == 1
    assert first["unrelated_open"] and second["unrelated_open"]


def test_a_descriptor_reused_for_another_socket_is_left_alone() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        inode = os.fstat(ours.fileno()).st_ino
        assert GroupSockets(((ours.fileno(), inode + 1),)).shutdown() == 0  # not the socket recorded
        ours.sendall(b"x")
        assert peer.recv(1) == b"x"
        assert GroupSockets(((ours.fileno(), inode),)).shutdown() == 1
        assert peer.recv(1) == b""  # the peer sees the end of the connection
        assert GroupSockets(((10_000, inode),)).shutdown() == 0  # a descriptor that is not open
