"""CUDA-graph runs of the engine: static buffers, their refilling, capture, replay and the graph cache.

For each batch layout the whole run (both networks, the fused steps, the schedule) is captured
once into a CUDA graph over static buffers and replayed per batch; churn noise is drawn before
the replay into static buffers, by the same ``randn_like`` calls in the same order as an eager
run, so graph and eager runs take the same noise.  Guidance weights, floats included, are read
from static slots, so one graph serves every value of w.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._settings import _Noise


@dataclass
class _Static:
    """The buffers a captured graph reads and writes; a replay refills the inputs and reads ``out``."""

    noise: torch.Tensor
    labels: Optional[torch.Tensor]
    guide_labels: Optional[torch.Tensor]
    eps: List[torch.Tensor]
    weights: list                  # per evaluation: None, or a static [B] tensor (a float's slot expanded)
    slots: List[torch.Tensor]      # per weight group: a [B] copy of a tensor weight, or a 0-d float64 slot
    flags: Optional[torch.Tensor] = None  # per step: did x become non-finite (check_finite)
    graph: Optional["torch.cuda.CUDAGraph"] = None
    out: Optional[torch.Tensor] = None


class _Emulated:
    """A stand-in for a captured graph (tests, CPU): replaying runs the same closure over the static buffers."""

    def __init__(self, run, st: _Static):
        self.run, self.st = run, st

    def replay(self):
        self.st.out = self.run()


def _groups(weights) -> Tuple:
    """Per evaluation: None (no guidance there), ("float", g) or ("tensor", dtype, g).

    Evaluations that hold the same tensor object, or floats of the same value, share group g (one
    static slot); the groups are part of the graph key, so a call whose weights alias differently
    gets its own graph instead of reading another evaluation's slot.
    """
    seen: Dict[tuple, int] = {}
    out = []
    for w in weights:
        if w is None:
            out.append(None)
        elif isinstance(w, torch.Tensor):
            out.append(("tensor", w.dtype, seen.setdefault(("tensor", id(w)), len(seen))))
        else:
            out.append(("float", seen.setdefault(("float", float(w).hex()), len(seen))))  # hex: -0.0 is not 0.0
    return tuple(out)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"capture failed ({type(exc).__name__}: {lines[0] if lines else 'no message'})"


def _release_pool(graph: "torch.cuda.CUDAGraph", device: torch.device, ended: bool) -> None:
    """Give back the private memory pool of a capture that failed.

    A graph whose capture ended releases its pool in reset(); when capture_end raised, the graph
    never owned the pool and would hold it for the life of the process, so it is released here.
    """
    if ended:
        graph.reset()
        return
    try:
        pool = graph.pool()
    except Exception:  # pragma: no cover - capture_begin itself failed: no pool was taken
        return
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        fn = getattr(torch._C, name, None)
        if fn is None:  # pragma: no cover - a torch without these bindings keeps the pool
            continue
        try:
            fn(device.index, pool)
        except Exception:  # pragma: no cover - capture_end got as far as ending the allocation
            pass


class GraphCache:
    """Captured runs keyed by the layout of a call's inputs; at most ``max_graphs`` kept, least recently used dropped.

    ``entries`` maps a key to its static buffers (``None``: capture failed, the reason in ``failed``).
    With ``emulate`` (tests, CPU), "capture" runs the closure once more (warm-up, then capture, as on
    a GPU) and keeps it, and "replay" calls it, so the static buffers, their refilling, the cache and
    the capture-failure path are exercised without a GPU.  ``capturing`` is True while a run is being
    captured (emulated too).
    """

    def __init__(self, max_graphs: int):
        self.max_graphs = max_graphs
        self.entries: "OrderedDict[tuple, Optional[_Static]]" = OrderedDict()
        self.failed: Dict[tuple, str] = {}
        self.last_key = None
        self.capturing = False

    @staticmethod
    def key(noise, labels, guide_labels, groups):
        def meta(t):
            return None if t is None else (tuple(t.shape), t.dtype, t.device)

        # Weights are read from static slots, so only where they apply and how they alias is part of the key.
        return (meta(noise), meta(labels), meta(guide_labels), guide_labels is labels, groups)

    @staticmethod
    def static(churned: int, dtype, noise, labels, guide_labels, weights, groups, flags) -> _Static:
        """Static copies of a call's inputs, laid out as the graph will read them."""
        def like(t):
            return None if not isinstance(t, torch.Tensor) else torch.empty_like(t, memory_format=torch.contiguous_format)

        st_labels = labels if not isinstance(labels, torch.Tensor) else like(labels)
        if guide_labels is labels:
            st_guide = st_labels
        else:
            st_guide = guide_labels if not isinstance(guide_labels, torch.Tensor) else like(guide_labels)
        batch = noise.shape[0]
        slots: List[torch.Tensor] = []
        views: List[torch.Tensor] = []
        st_weights = []
        for w, group in zip(weights, groups):
            if group is None:
                st_weights.append(None)
                continue
            g = group[-1]
            if g == len(slots):
                if group[0] == "tensor":
                    slot = torch.empty(w.shape, dtype=w.dtype, device=w.device)
                    view = slot
                else:
                    # A float weight as a 0-d float64 slot read by every sample: the kernels form
                    # coefficients in float64, so this gives the float's results bitwise.
                    slot = torch.empty((), dtype=torch.float64, device=noise.device)
                    view = slot.expand(batch)
                slots.append(slot)
                views.append(view)
            st_weights.append(views[g])
        eps = [torch.empty(noise.shape, dtype=dtype, device=noise.device) for _ in range(churned)]
        return _Static(noise=like(noise), labels=st_labels, guide_labels=st_guide, eps=eps,
                       weights=st_weights, slots=slots, flags=flags)

    @staticmethod
    def fill(st: _Static, dtype, noise, labels, guide_labels, weights, groups, randn_like):
        """Copy a call's inputs into the static buffers; draw its churn noise in the reference's order."""
        st.noise.copy_(noise)
        if isinstance(st.labels, torch.Tensor):
            st.labels.copy_(labels)
        if isinstance(st.guide_labels, torch.Tensor) and st.guide_labels is not st.labels:
            st.guide_labels.copy_(guide_labels)
        # Each slot takes its group's first weight (the others in the group are the same object or value).
        done = 0
        for w, group in zip(weights, groups):
            if group is None or group[-1] < done:
                continue
            slot = st.slots[group[-1]]
            if group[0] == "tensor":
                slot.copy_(w)
            else:
                slot.fill_(float(w))
            done += 1
        draw = _Noise(randn_like, noise.shape, dtype, noise.device)
        for buf in st.eps:
            buf.copy_(draw(buf))

    def call(self, run: Callable, churned: int, dtype, noise, labels, guide_labels, weights, randn_like,
             new_flags: Callable[[], Optional[torch.Tensor]]):
        """(samples, None, None) from a graph replay, or (None, why not, churn noise already drawn or None).

        ``run(noise, labels, guide_labels, weights, eps, flags)`` is one whole run of the sampler;
        it is captured over static buffers the first time a key is seen and replayed after that.
        When that capture fails, this call's churn noise has been drawn into static buffers: the
        caller's eager run must use it, so that the first batch takes the noise an eager run would.
        """
        groups = _groups(weights)
        key = self.key(noise, labels, guide_labels, groups)
        self.last_key = key
        device = noise.device
        if key in self.entries:
            self.entries.move_to_end(key)
            st = self.entries[key]
            if st is None:
                return None, self.failed[key], None
            self.fill(st, dtype, noise, labels, guide_labels, weights, groups, randn_like)
            self._replay(st, device)
            return st.out.clone(), None, None
        # Outside the caller's inference mode: later calls outside it refill these buffers in place.
        with torch.inference_mode(False):
            st = self.static(churned, dtype, noise, labels, guide_labels, weights, groups, new_flags())
        self.fill(st, dtype, noise, labels, guide_labels, weights, groups, randn_like)
        eps = st.eps

        def replay_run():
            return run(st.noise, st.labels, st.guide_labels, st.weights, lambda k, x: eps[k], st.flags)

        reason = self._capture(st, replay_run, device)
        if reason is not None:
            self._remember(key, None, reason)
            return None, reason, eps
        self._remember(key, st, None)
        self._replay(st, device)
        return st.out.clone(), None, None

    @staticmethod
    def _replay(st: _Static, device: torch.device) -> None:
        if device.type != "cuda":  # emulated (tests)
            st.graph.replay()
            return
        with torch.cuda.device(device):
            st.graph.replay()

    def _capture(self, st: _Static, replay_run: Callable, device: torch.device) -> Optional[str]:
        """Warm up, then capture ``replay_run`` into ``st.graph``; None, or why the capture failed.

        A genuine error of the networks is raised by the warm-up, as in an eager run.
        """
        if device.type != "cuda":  # emulated (tests): warm-up, "capture", as on a GPU
            replay_run()
            self.capturing = True
            try:
                replay_run()
            except Exception as exc:
                return _reason(exc)
            finally:
                self.capturing = False
            st.graph = _Emulated(replay_run, st)
            return None
        # Everything under the tensors' device, on a stream of that device, whatever device is current.
        with torch.cuda.device(device):
            caller = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            # Warm up on the side stream (lazy initialization, autotuning, Triton compiles and
            # torch.compile happen here, not under capture).
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                replay_run()
            caller.wait_stream(side)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            error, began, ended = None, False, False
            self.capturing = True
            try:
                # torch.cuda.graph leaves its capture stream current when capture_end raises and reports
                # capture_end's error instead of the network's: so the capture is driven here, and the
                # stream context restores the caller's stream on every path.
                with torch.cuda.stream(side):
                    try:
                        graph.capture_begin(capture_error_mode="thread_local")
                        began = True
                        st.out = replay_run()
                    except Exception as exc:
                        error = exc
                    if began:
                        try:
                            graph.capture_end()
                            ended = True
                        except Exception as exc:
                            error = error if error is not None else exc
            finally:
                self.capturing = False
            if error is None:
                st.graph = graph
                return None
            reason = _reason(error)
            error = None  # its traceback holds tensors of the failed capture's pool
            st.out = None
            if began:
                _release_pool(graph, device, ended)
            try:
                torch.cuda.synchronize(device)
            except Exception:  # pragma: no cover - the eager run will report a broken device
                pass
            return reason

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
