"""Starting and joining a tensor-parallel job on one host.

`planlang apply|bench PLAN [MODEL] --nproc N` runs `maybe_launch(argv, N)` first: it starts
N processes with torch.distributed.run (torchrun's own launcher: a standalone c10d
rendezvous on localhost, no restarts), each running the same command without `--nproc`,
waits for them and returns the job's exit status. Under an existing torchrun (its
`WORLD_SIZE`, `RANK` in the environment) nothing is started: the command joins that job.

Each process then calls `init_distributed(device)`: the default process group over NCCL
(CUDA) or gloo (CPU), with a timeout, so a collective that one rank never reaches fails
after `timeout_s` instead of hanging; rank 0 alone writes to stdout (the report), every
rank keeps stderr (errors). When a rank fails, torchrun stops the others and the job exits
with that rank's status; `run_torchrun` returns it and names the rank.
"""
from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from typing import Optional, Sequence

import torch

CHILD_ENV = "PLANLANG_TP_CHILD"      # set in the processes maybe_launch starts
TIMEOUT_ENV = "PLANLANG_TP_TIMEOUT"  # seconds; overrides the default below
# Long enough for ranks that compile (Inductor, autotuning) at different speeds to meet at
# their first collective; short enough that a rank stuck in a collective gives up.
DEFAULT_TIMEOUT_S = 300.0


def under_torchrun() -> bool:
    """Whether this process is a worker of a torchrun job (its environment says so)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def maybe_launch(argv: Optional[Sequence[str]], nproc: Optional[int]) -> Optional[int]:
    """Start `nproc` processes running `planlang <argv without --nproc>` and return the
    job's exit status; or None when this process should run the command itself: no
    `--nproc` (or 1), or already a worker of a torchrun job of that size. A worker of a
    job of another size gets exit status 2 and a message."""
    if not nproc or nproc < 1:
        return None
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != nproc:
            print(f"planlang: error: --nproc {nproc} inside a torchrun job of {world} process(es); "
                  f"drop --nproc under torchrun, or start torchrun with --nproc-per-node {nproc}", file=sys.stderr)
            return 2
        return None
    if nproc == 1 or os.environ.get(CHILD_ENV) == "1":  # a rank this launcher started never launches again
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_torchrun(nproc, ["-m", "planlang.cli", *strip_nproc(argv)])


def run_torchrun(nproc: int, program: Sequence[str], *, monitor_interval: float = 0.2) -> int:
    """Run `python <program...>` in `nproc` processes on this host under torchrun's launcher
    (torch.distributed.run); 0 when every rank exits with 0, else the status of the rank
    torchrun saw fail first (1 for a rank killed by a signal). Every failed rank is named
    on stderr (a rank whose peer died fails too: its collective loses the connection, or
    times out)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                       f"--monitor-interval={monitor_interval}", "--no-python", sys.executable, *program])
    saved = os.environ.get(CHILD_ENV)
    os.environ[CHILD_ENV] = "1"
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    if saved_omp is None:
        # torchrun would set 1 and warn; give each rank its share of the cores instead.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        failed = ", ".join(f"rank {r} of {nproc} failed (exit status {f.exitcode})"
                           for r, f in sorted(exc.failures.items()))
        print(f"planlang: {failed}; the job was stopped", file=sys.stderr)
        return code
    finally:
        if saved is None:
            os.environ.pop(CHILD_ENV, None)
        else:
            os.environ[CHILD_ENV] = saved
        if saved_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


def rank_device(device: torch.device) -> torch.device:
    """The device this rank runs on: `cuda:LOCAL_RANK` for a CUDA device under torchrun,
    else `device` unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and under_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    return device


def init_distributed(device: Optional[torch.device] = None, *, timeout_s: Optional[float] = None,
                     quiet_others: bool = True) -> tuple[int, int]:
    """(rank, world size) of this process. Under torchrun: initializes the default process
    group once (NCCL for a CUDA device, which becomes the current device; gloo on the CPU)
    with a timeout on every collective (`timeout_s`, else $PLANLANG_TP_TIMEOUT, else 300 s),
    destroyed at exit; with `quiet_others`, ranks other than 0 stop writing to stdout.
    Outside torchrun, or when a group exists already, it starts nothing: (0, 1), or the
    existing group's numbers."""
    import torch.distributed as dist
    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not under_torchrun():
        return 0, 1
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise SystemExit(f"planlang: error: {TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    device = rank_device(torch.device(device) if device is not None else torch.device("cpu"))
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
        kwargs["device_id"] = device
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except TypeError:  # a torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    atexit.register(_destroy)
    rank, world = dist.get_rank(), dist.get_world_size()
    if quiet_others and rank != 0:
        sys.stdout = open(os.devnull, "w")
    return rank, world


def _destroy() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the job is ending anyway
            pass
