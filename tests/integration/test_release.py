"""A survivor waiting on another survivor is released when a third rank dies: real gloo, three processes.

Rank 1 dies; rank 0 sees it (a receive from it fails); rank 2 is blocked in a broadcast from rank 0 and talks to
nobody else, so only rank 0 dropping its group can release it. Each survivor runs its collectives through
``run_or_leave``, the function ``WorkerActor.train`` runs its steps through. Rank 0 stays alive after
leaving until rank 2 has answered: if its group outlived the leave, rank 2 would wait for the group's
timeout (an error that says so) instead of seeing the connection close. Automatic garbage collection is
off in the ranks, so the test does not depend on when one happens to run.
"""

from __future__ import annotations

import gc
import os
import queue
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.cluster.actor import run_or_leave
from trainer.errors import UserCodeError

GROUP_TIMEOUT_S = 45


def _leave() -> None:
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def _rank(rank: int, port: int, user_error: bool, replies: Any, rank2_done: Any) -> None:
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=False)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=3, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
    )
    dist.barrier()
    gc.disable()
    if rank == 1:
        os._exit(1)  # a lost rank: its sockets close

    def body() -> None:
        # The step's frames hold the group inside a reference cycle, as a DDP wrapper and its hooks do: only
        # a collection frees it once nothing else refers to it (and automatic collections are off here).
        wrapper: dict[str, Any] = {"group": dist.group.WORLD}
        wrapper["self"] = wrapper
        group = wrapper["group"]
        if rank == 2:
            dist.broadcast(torch.ones(4), src=0, group=group)
        else:
            dist.all_reduce(torch.ones(4096), group=group)  # fails: rank 1 is gone

    def body_user() -> None:
        try:
            body()
        except RuntimeError as exc:
            raise UserCodeError(f"Task.loss raised {exc}") from None

    try:
        failure = run_or_leave(body_user if (user_error and rank == 0) else body, _leave)
    except UserCodeError as exc:
        failure = f"UserCodeError: {exc}"
    replies.put((rank, failure))
    if rank == 0:
        rank2_done.wait(GROUP_TIMEOUT_S * 2)  # alive until rank 2 is released (or timed out)


@pytest.mark.parametrize("user_error", [False, True], ids=["collective_error", "user_error"])
def test_a_survivor_waiting_on_a_survivor_is_released(user_error: bool) -> None:
    ctx = mp.get_context("spawn")
    replies, rank2_done = ctx.Queue(), ctx.Event()
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    procs = [
        ctx.Process(target=_rank, args=(r, store.port, user_error, replies, rank2_done), daemon=True)
        for r in range(3)
    ]
    for p in procs:
        p.start()
    answers: dict[int, str | None] = {}
    try:
        while len(answers) < 2:
            rank, failure = replies.get(timeout=GROUP_TIMEOUT_S * 3)
            answers[rank] = failure
            if rank == 2:
                rank2_done.set()
    except queue.Empty:
        pytest.fail(f"survivors did not answer: {answers}")
    finally:
        rank2_done.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert answers[0] is not None and answers[2] is not None, answers
    assert "Timed out" not in answers[0], f"rank 0 should have seen rank 1 go: {answers[0]}"
    if user_error:
        assert answers[0].startswith("UserCodeError: Task.loss raised"), answers[0]
    # Released by the closed connection, not by the group's timeout.
    assert "Connection closed by peer" in answers[2], answers[2]
    assert "Timed out" not in answers[2], answers[2]
