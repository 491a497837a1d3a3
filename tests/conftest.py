"""Test set-up: the Triton interpreter on CPU-only machines, and the suite's random seeds.

TRITON_INTERPRET must be set before triton compiles (decorates) any kernel, that is before
ag_kernels is imported, so it is set here, at collection time.

Seeds.  By default every run is deterministic: the ``gen`` fixture's generator, torch's global
generator and Python's ``random`` start from seed 0 in every test, whatever ran before it, so CI
fails only on inputs someone has seen.  Exploration is opt-in, through ``AG_TEST_SEED``:

* ``AG_TEST_SEED=N``: seed N (to repeat a failure: the seed is printed with a test's output);
* ``AG_TEST_SEED=A-B``: each test that takes ``gen`` runs once per seed A..B (ids ``seedA`` ...);
* ``AG_TEST_SEED=random``: a fresh seed for each test, printed; ``random:K``: each test that takes
  ``gen`` runs with K fresh seeds (drawn once per session and shown in the report header).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

DEFAULT_SEED = 0
#: Top-level modules of an EDM2 checkout (the real one, tests/edm_standin, or one a test writes) and of
#: the VAE library that its latent encoder imports: each test starts without the checkout's and ends
#: with sys.modules as it found them, so no test sees another's checkout, whatever ran before.
CHECKOUT_MODULES = ("dnnlib", "torch_utils", "training", "generate_images")
RESTORED_MODULES = CHECKOUT_MODULES + ("diffusers",)


def _seeds(spec):
    """The seeds that ``AG_TEST_SEED``'s value ``spec`` names (one or more); raises ValueError when malformed."""
    spec = (spec or "").strip()
    if not spec:
        return [DEFAULT_SEED]
    if spec == "random" or spec.startswith("random:"):
        count = int(spec.split(":", 1)[1]) if ":" in spec else 1
        if count < 1:
            raise ValueError("the count must be at least 1")
        return [None] if spec == "random" else [secrets.randbits(31) for _ in range(count)]
    if "-" in spec.lstrip("-"):
        first, last = (int(v) for v in spec.split("-", 1))
        if not 0 <= first <= last:
            raise ValueError("a range A-B needs 0 <= A <= B")
        return list(range(first, last + 1))
    seed = int(spec)
    if seed < 0:
        raise ValueError("a seed is >= 0")
    return [seed]


try:
    SEEDS = _seeds(os.environ.get("AG_TEST_SEED"))
except ValueError as exc:
    raise pytest.UsageError(f"AG_TEST_SEED={os.environ.get('AG_TEST_SEED')!r}: {exc}; use N, A-B, random or "
                            "random:K") from None


def pytest_generate_tests(metafunc):
    # With several seeds, every test that takes ``gen`` runs once per seed; with one, ids are unchanged.
    if "gen" in metafunc.fixturenames and len(SEEDS) > 1:
        metafunc.parametrize("_seed", SEEDS, ids=[f"seed{s}" for s in SEEDS], indirect=True)


def pytest_report_header(config):
    shown = "a fresh one per test" if SEEDS == [None] else SEEDS if len(SEEDS) <= 4 else (
        f"{SEEDS[:2]} ... {SEEDS[-1:]} ({len(SEEDS)} seeds)")
    return f"ag_kernels: AG_TEST_SEED seeds {shown}"


@pytest.fixture
def _seed(request):
    seed = getattr(request, "param", SEEDS[0])
    return secrets.randbits(31) if seed is None else seed


@pytest.fixture(autouse=True)
def _seed_global_generators(_seed):
    """torch's and Python's global generators start each test from its seed, so order does not matter."""
    torch.manual_seed(_seed)
    random.seed(_seed)


@pytest.fixture
def gen(_seed):
    """A CPU generator seeded with this test's seed (printed: ``AG_TEST_SEED=N`` repeats it)."""
    print(f"AG_TEST_SEED={_seed}")
    return torch.Generator().manual_seed(_seed)


def _top(name):
    return name.split(".", 1)[0]


@pytest.fixture(autouse=True)
def _isolate_checkouts():
    """Each test sees no checkout's modules at its start; sys.path and those modules are restored after it."""
    path = list(sys.path)
    saved = {n: m for n, m in sys.modules.items() if _top(n) in RESTORED_MODULES}
    for name in saved:
        if _top(name) in CHECKOUT_MODULES:
            del sys.modules[name]
    yield
    sys.path[:] = path
    for name in [n for n in sys.modules if _top(n) in RESTORED_MODULES]:
        del sys.modules[name]
    sys.modules.update(saved)
    importlib.invalidate_caches()
