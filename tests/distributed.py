"""Running a function on several local processes that form a gloo process group.

Workers bind to 127.0.0.1 on a free port; a run that overstays its timeout is killed, so a
hung collective fails the test instead of hanging it, and no process outlives the test.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_and_run(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Call `fn(rank, *args)` on `world` spawned processes inside one gloo group."""
    context = mp.start_processes(
        _init_and_run, args=(world, free_port(), fn, args), nprocs=world, join=False
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"workers did not finish within {timeout} s")


def torchrun_launcher(world: int) -> list[str]:
    """The launcher command for `world` local processes, its rendezvous on a free loopback
    port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]


def run_command(command: list[str], timeout: float, **kwargs) -> str:
    """Run a launcher (e.g. torchrun) in its own process group; kill the whole group on timeout
    so no worker outlives the test. Returns stdout+stderr; fails the test on a non-zero exit."""
    import signal
    import subprocess

    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s:\n{output[-3000:]}")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {process.returncode}:\n{output[-5000:]}")
    return output
