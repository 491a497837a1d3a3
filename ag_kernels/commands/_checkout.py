"""What the two verify commands share: the error they report and a fresh import of an EDM2 checkout's ``generate_images.py``."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

_module_ids = itertools.count()


class ReferenceSamplerError(RuntimeError):
    """The reference sampler could not be loaded from the given checkout, or it failed to run."""


def _pip_hint(module: str) -> str:
    top = module.split(".")[0]
    return {"PIL": "Pillow", "yaml": "PyYAML", "sklearn": "scikit-learn"}.get(top, top)


def load_reference_module(edm2_path):
    """The module ``generate_images.py`` of an EDM2 checkout at ``edm2_path``, freshly imported.

    ``edm2_path`` is the checkout's root (the folder holding ``generate_images.py``; a path to
    that file itself also works).  The root is put on ``sys.path`` while the file is imported,
    since the file imports the checkout's own packages (``dnnlib``, ``torch_utils``); ``sys.path``
    is restored afterwards.  The module is imported under a unique private name, so it never
    replaces or is mistaken for another ``generate_images`` and its command-line entry point
    (guarded by ``__name__ == "__main__"``) does not run.

    Raises:
        ReferenceSamplerError: the path does not exist, has no generate_images.py, or the import fails
            (naming a missing module, e.g. ``click``).
    """
    root = Path(edm2_path).expanduser()
    if not root.exists():
        raise ReferenceSamplerError(f"--edm2: {str(root)!r} does not exist; pass the root of your clone of "
                                    "https://github.com/NVlabs/edm2")
    if root.is_file():
        file, root = root, root.parent
    else:
        file = root / "generate_images.py"
        if not file.is_file():
            raise ReferenceSamplerError(f"--edm2: no generate_images.py in {str(root)!r}; pass the root of your "
                                        "clone of https://github.com/NVlabs/edm2")
    name = f"_ag_kernels_reference_{next(_module_ids)}_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ReferenceSamplerError(f"--edm2: cannot import {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    sys.path.insert(0, str(root.resolve()))
    # Registered while it runs, as a normal import would be (dataclasses, pickling look it up).
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        sys.modules.pop(name, None)
        missing = exc.name or str(exc)
        if (root / missing.split(".")[0]).exists():
            why = (f"module {missing!r} (part of the checkout) could not be imported; "
                   "is the checkout complete?")
        else:
            why = (f"module {missing!r} is not installed.  The reference needs its checkout's own packages "
                   f"(dnnlib, torch_utils, found next to generate_images.py) and their dependencies "
                   f"(click, Pillow, numpy, tqdm, ...) installed in this environment: pip install {_pip_hint(missing)}")
        raise ReferenceSamplerError(f"--edm2: importing {str(file)!r} failed: {why}") from exc
    except BaseException as exc:  # noqa: BLE001 - any failure of foreign code, reported with its type
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ReferenceSamplerError(f"--edm2: importing {str(file)!r} raised {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path[:] = saved_path
    return module
