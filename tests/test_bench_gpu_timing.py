"""The GPU step-op timing of bench/_common.py (run_rotating), checked on the CPU with stand-ins for
CUDA events: each round is one block of launches between two events, cycling through buffer
sets that make up at least four times the L2, and the per-launch times and their median are
recorded for the report.  No timing is asserted: the stand-in clock only makes the plumbing run.
"""

import time

import torch

import bench._common as common


class _Event:
    """A stand-in for torch.cuda.Event(enable_timing=True): host time at record()."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _Benchmark:
    def __init__(self):
        self.extra_info, self.rounds = {}, 0

    def pedantic(self, fn, rounds, iterations):
        for _ in range(rounds):
            fn()
            self.rounds += 1


def _data(device, n, d_dtype):
    key = (device, n, d_dtype)
    if key not in common._DATA:
        x = torch.randn(n)
        common._DATA[key] = dict(x=x, x_euler=0.7 * x, d_main=(0.9 * x).to(d_dtype), d_guide=(0.8 * x).to(d_dtype),
                                 out=torch.empty(n), b1=torch.empty(n), b2=torch.empty(n))
    return common._DATA[key]


def test_gpu_timing_cycles_buffer_sets_between_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(common, "_l2_bytes", lambda: 1 << 20)  # a 1 MiB "L2"
    monkeypatch.setattr(common, "data", _data)
    monkeypatch.setattr(common, "_DATA", {})
    sets = common.rotation("cuda", 4096, torch.bfloat16)
    assert len(sets) >= 2 and len(sets) * common._set_bytes(sets[0]) >= 4 << 20
    assert all(torch.equal(s["x"], sets[0]["x"]) and s["x"].data_ptr() != sets[0]["x"].data_ptr() for s in sets[1:])
    calls = []
    bench = _Benchmark()
    common.run_rotating(bench, "cuda", lambda b: (lambda: calls.append(id(b))), sets, 1234, case="ext", n=4096)
    info = bench.extra_info
    assert bench.rounds == common.GPU_ROUNDS and len(info["event_times_s"]) == common.GPU_ROUNDS
    assert info["event_median_s"] > 0 and info["timing"] == "cuda-events" and info["bytes"] == 1234
    assert info["latency_bound"] is True and info["buffer_sets"] == len(sets)
    launches = info["launches_per_round"]
    assert launches >= max(common.GPU_LAUNCHES, 2 * len(sets))
    # One warm-up call, one warm-up round, then the timed rounds, each over every set in turn.
    assert len(calls) == 1 + launches * (1 + common.GPU_ROUNDS)
    assert calls[1:1 + len(sets)] == [id(s) for s in sets]
    big = common.rotation("cuda", 2**18, torch.float32)  # 7 MiB a set
    assert len(big) == 2  # one set is already larger than four L2s: two, so launches alternate
