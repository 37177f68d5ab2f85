"""`graph_time_us` (runtime/bench.py), the benchmarks' one way of timing calls as CUDA-graph
replays: what it promises without a GPU (its arguments, the refusal or eager fallback on the
CPU, warm-up counts, the per-call division and the statistic, through an injected timer),
one capture on a GPU, and that the five benchmark scripts built on it still start."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from planlang.runtime.bench import graph_time_us

CPU = torch.device("cpu")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


class Counter:
    """A call that counts how often it ran and returns that count."""

    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return self.n


def scripted(values):
    """A timer that runs each sample and reports the next of `values` (microseconds)."""
    it = iter(values)

    def timer(sample):
        sample()
        return next(it)
    return timer


def test_the_cpu_is_refused_without_eager_fallback_before_anything_runs():
    call = Counter()
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device.*eager_fallback=True"):
        graph_time_us([call], device=CPU)
    assert call.n == 0


@pytest.mark.parametrize("kwargs, word", [
    (dict(reps=0), "reps"), (dict(inner=0), "inner"), (dict(count=0), "count"), (dict(warmup=-1), "warmup"),
    (dict(side_warmup=-1), "side_warmup"), (dict(eager_first=2), "eager_first"), (dict(stat="mean"), "stat"),
])
def test_bad_arguments_are_refused_by_name_before_anything_runs(kwargs, word):
    call = Counter()
    with pytest.raises(ValueError, match=word):
        graph_time_us([call], device=CPU, eager_fallback=True, **kwargs)
    assert call.n == 0


def test_no_calls_are_refused():
    with pytest.raises(ValueError, match="no calls"):
        graph_time_us([], device=CPU, eager_fallback=True)


@pytest.mark.parametrize("stat, expected", [("median", 30.0), ("min", 10.0)])
def test_the_statistic_is_taken_over_samples_divided_by_inner_and_count(stat, expected):
    samples = [40.0, 10.0, 30.0, 50.0, 20.0]  # us per sample of `inner` passes over 2 calls
    us = graph_time_us([Counter(), Counter()], reps=5, inner=4, stat=stat, device=CPU, eager_fallback=True,
                       timer=scripted(samples))
    assert us == pytest.approx(expected / 4 / 2)


def test_count_overrides_the_calls_one_pass_makes():
    us = graph_time_us([Counter()], reps=1, inner=20, count=16, device=CPU, eager_fallback=True,
                       timer=scripted([320.0]))
    assert us == pytest.approx(1.0)


@pytest.mark.parametrize("queued", [False, True])
def test_each_call_runs_its_warm_ups_and_every_timed_pass(queued):
    first, second = Counter(), Counter()
    graph_time_us([first, second], reps=3, inner=2, warmup=5, eager_first=1, side_warmup=2, queued=queued,
                  device=CPU, eager_fallback=True, timer=scripted([1.0] * 3))
    passes = 2 + 5 + 3 * 2 + (3 if queued else 0)  # side warm-up, warm-up, timed, queued-behind
    assert (first.n, second.n) == (1 + passes, passes)


def test_the_eager_fallback_keeps_the_last_timed_passs_outputs():
    call, outputs = Counter(), []
    graph_time_us([call], reps=2, inner=3, warmup=1, side_warmup=0, device=CPU, eager_fallback=True,
                  outputs=outputs, timer=scripted([1.0, 1.0]))
    assert outputs == [call.n] == [7]


def test_the_default_cpu_timer_measures_the_eager_loop():
    assert graph_time_us([lambda: sum(range(1000))], reps=3, device=CPU, eager_fallback=True) > 0


@pytest.mark.gpu
def test_a_captured_graph_is_timed_and_its_outputs_hold_the_last_replay():
    x = torch.zeros(4, device="cuda")

    def bump():
        x.add_(1)  # each replay adds one
        return x * 2
    outputs = []
    us = graph_time_us([bump], reps=3, inner=2, warmup=1, side_warmup=1, outputs=outputs)
    torch.cuda.synchronize()
    passes = 1 + 1 + 3 * 2  # side warm-up, warm-up replay, timed replays (capture does not run it)
    assert us > 0
    assert torch.equal(x, torch.full((4,), float(passes), device="cuda"))
    assert torch.equal(outputs[0], 2 * x)


@pytest.mark.parametrize("script", ["bench_fp8", "bench_pdl", "bench_kernels_a", "bench_tp", "bench_norm_gemm"])
def test_a_benchmark_script_on_graph_time_us_still_starts(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
