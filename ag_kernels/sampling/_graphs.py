"""CUDA-graph runs of the engine: static buffers, their refilling, capture, replay and the graph cache.

For each batch layout the whole run (both networks, the fused steps, the schedule) is captured
once into a CUDA graph over static buffers and replayed per batch; churn noise is drawn before
the replay into static buffers, by the same ``randn_like`` calls in the same order as an eager
run, so graph and eager runs take the same noise.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ._settings import _Noise


@dataclass
class _Static:
    """The buffers a captured graph reads and writes; a replay refills the inputs and reads ``out``."""

    noise: torch.Tensor
    labels: Optional[torch.Tensor]
    guide_labels: Optional[torch.Tensor]
    eps: List[torch.Tensor]
    weights: list                  # per evaluation: None, a float, or a static [B] tensor
    slots: Dict[int, torch.Tensor]  # id of a caller's weight tensor -> its static copy (filled per call)
    flags: Optional[torch.Tensor] = None  # per step: did x become non-finite (check_finite)
    graph: Optional["torch.cuda.CUDAGraph"] = None
    out: Optional[torch.Tensor] = None


class _Emulated:
    """A stand-in for a captured graph (tests, CPU): replaying runs the same closure over the static buffers."""

    def __init__(self, run, st: _Static):
        self.run, self.st = run, st

    def replay(self):
        self.st.out = self.run()


class GraphCache:
    """Captured runs keyed by the layout of a call's inputs; at most ``max_graphs`` kept, least recently used dropped.

    ``entries`` maps a key to its static buffers (``None``: capture failed, the reason in ``failed``).
    With ``emulate`` (tests, CPU), "capture" keeps the run's closure and "replay" calls it, so the
    static buffers, their refilling and the cache are exercised without a GPU.
    """

    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self.entries: "OrderedDict[tuple, Optional[_Static]]" = OrderedDict()
        self.failed: Dict[tuple, str] = {}
        self.last_key = None

    @staticmethod
    def key(noise, labels, guide_labels, weights):
        def meta(t):
            return None if t is None else (tuple(t.shape), t.dtype, t.device)

        # Floats are baked into the graph's kernel launches; per-sample tensors are read from
        # static buffers, so only their place in the run (and dtype) is part of the key.
        pattern = tuple(w if not isinstance(w, torch.Tensor) else ("tensor", w.dtype) for w in weights)
        return (meta(noise), meta(labels), meta(guide_labels), guide_labels is labels, pattern)

    @staticmethod
    def static(churned: int, dtype, noise, labels, guide_labels, weights, flags) -> _Static:
        """Static copies of a call's inputs, laid out as the graph will read them."""
        def like(t):
            return None if not isinstance(t, torch.Tensor) else torch.empty_like(t, memory_format=torch.contiguous_format)

        st_labels = labels if not isinstance(labels, torch.Tensor) else like(labels)
        if guide_labels is labels:
            st_guide = st_labels
        else:
            st_guide = guide_labels if not isinstance(guide_labels, torch.Tensor) else like(guide_labels)
        slots: Dict[int, torch.Tensor] = {}
        st_weights = []
        for w in weights:
            if isinstance(w, torch.Tensor):
                if id(w) not in slots:
                    slots[id(w)] = torch.empty(w.shape, dtype=w.dtype, device=w.device)
                st_weights.append(slots[id(w)])
            else:
                st_weights.append(w)
        eps = [torch.empty(noise.shape, dtype=dtype, device=noise.device) for _ in range(churned)]
        return _Static(noise=like(noise), labels=st_labels, guide_labels=st_guide, eps=eps,
                       weights=st_weights, slots=slots, flags=flags)

    @staticmethod
    def fill(st: _Static, dtype, noise, labels, guide_labels, weights, randn_like):
        """Copy a call's inputs into the static buffers; draw its churn noise in the reference's order."""
        st.noise.copy_(noise)
        if isinstance(st.labels, torch.Tensor):
            st.labels.copy_(labels)
        if isinstance(st.guide_labels, torch.Tensor) and st.guide_labels is not st.labels:
            st.guide_labels.copy_(guide_labels)
        # The static slots follow the run's evaluation order; this call's tensors go in the same order.
        done = set()
        for w, slot in zip(weights, st.weights):
            if isinstance(w, torch.Tensor) and id(slot) not in done:
                slot.copy_(w)
                done.add(id(slot))
        draw = _Noise(randn_like, noise.shape, dtype, noise.device)
        for buf in st.eps:
            buf.copy_(draw(buf))

    def call(self, run: Callable, churned: int, dtype, noise, labels, guide_labels, weights, randn_like,
             new_flags: Callable[[], Optional[torch.Tensor]]):
        """(samples, None) from a graph replay, or (None, why not).

        ``run(noise, labels, guide_labels, weights, eps, flags)`` is one whole run of the sampler;
        it is captured over static buffers the first time a key is seen and replayed after that.
        """
        key = self.key(noise, labels, guide_labels, weights)
        self.last_key = key
        if key in self.entries:
            self.entries.move_to_end(key)
            st = self.entries[key]
            if st is None:
                return None, self.failed[key]
            self.fill(st, dtype, noise, labels, guide_labels, weights, randn_like)
            st.graph.replay()
            return st.out.clone(), None
        st = self.static(churned, dtype, noise, labels, guide_labels, weights, new_flags())
        self.fill(st, dtype, noise, labels, guide_labels, weights, randn_like)
        eps = st.eps

        def replay_run():
            return run(st.noise, st.labels, st.guide_labels, st.weights, lambda k, x: eps[k], st.flags)

        device = noise.device
        if device.type != "cuda":  # emulated (tests)
            st.graph = _Emulated(replay_run, st)
            self._remember(key, st, None)
            st.graph.replay()
            return st.out.clone(), None
        # Warm up on a side stream (lazy initialization, autotuning, Triton compiles and
        # torch.compile happen here, not under capture); a genuine error of the networks is raised
        # here, as in an eager run.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            replay_run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                st.out = replay_run()
        except Exception as exc:  # capture rejected something the networks do: run eagerly from now on
            lines = str(exc).strip().splitlines()
            reason = f"capture failed ({type(exc).__name__}: {lines[0] if lines else 'no message'})"
            try:
                torch.cuda.synchronize(device)
            except Exception:  # pragma: no cover - the eager run will report a broken device
                pass
            self._remember(key, None, reason)
            return None, reason
        st.graph = graph
        self._remember(key, st, None)
        graph.replay()
        return st.out.clone(), None

    def _remember(self, key, st, reason):
        self.entries[key] = st
        if reason is not None:
            self.failed[key] = reason
        while len(self.entries) > self.max_graphs:
            old, _ = self.entries.popitem(last=False)
            self.failed.pop(old, None)

    def clear(self) -> None:
        self.entries.clear()
        self.failed.clear()
