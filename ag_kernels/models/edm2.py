"""Everything EDM2-specific: the user's NVlabs/edm2 checkout, snapshot pickles, encoders, presets.

EDM2 snapshots (``.pkl``, e.g. the published post-hoc EMA reconstructions) are pickles of
``{"ema": network, "encoder": encoder, ...}`` whose classes live in the EDM2 code (``dnnlib``,
``torch_utils``, ``training``).  Unpickling them needs that code importable and runs code named
by the file, so it happens only with ``allow_pickle=True`` (CLI: ``--allow-pickle``), for files
the user trusts.  No EDM2 code is part of ag_kernels: the user points us at their own checkout
(``--edm2 PATH`` or the environment variable ``AG_EDM2_PATH``).

Presets carry the reference generator's table (``generate_images.py``): which main and guiding
snapshot and which guidance weight give each published result (Karras et al. 2024, Table 1
and the EDM2 paper).  The files are resolved in a local folder (``--models DIR``); nothing is
downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, UnsafeCheckpointError, _full_unpickle

__all__ = ["EDM2Error", "PRESETS", "MODEL_ROOT", "Preset", "find_checkout", "use_checkout", "resolve_preset",
           "load_snapshot", "prepare_encoder", "ENV_VAR"]

ENV_VAR = "AG_EDM2_PATH"
#: Where the reference generator downloads the published snapshots from.
MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
#: The reference generator's encoder batch size (``encoder_batch_size``); the VAE decodes in chunks of it.
ENCODER_BATCH_SIZE = 4


class EDM2Error(ValueError):
    """A user-facing problem with the EDM2 checkout, a snapshot, a preset or the decoder."""


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class Preset:
    name: str
    net: str                 # main network snapshot file name
    gnet: Optional[str]      # guiding network snapshot file name (None: no guidance)
    guidance: float


# name, main snapshot, guiding snapshot ("-": none), guidance weight; the reference's table.
_TABLE = """
edm2-img512-xs-fid               edm2-img512-xs-2147483-0.135.pkl         -                                        1
edm2-img512-xs-dino              edm2-img512-xs-2147483-0.200.pkl         -                                        1
edm2-img512-s-fid                edm2-img512-s-2147483-0.130.pkl          -                                        1
edm2-img512-s-dino               edm2-img512-s-2147483-0.190.pkl          -                                        1
edm2-img512-m-fid                edm2-img512-m-2147483-0.100.pkl          -                                        1
edm2-img512-m-dino               edm2-img512-m-2147483-0.155.pkl          -                                        1
edm2-img512-l-fid                edm2-img512-l-1879048-0.085.pkl          -                                        1
edm2-img512-l-dino               edm2-img512-l-1879048-0.155.pkl          -                                        1
edm2-img512-xl-fid               edm2-img512-xl-1342177-0.085.pkl         -                                        1
edm2-img512-xl-dino              edm2-img512-xl-1342177-0.155.pkl         -                                        1
edm2-img512-xxl-fid              edm2-img512-xxl-0939524-0.070.pkl        -                                        1
edm2-img512-xxl-dino             edm2-img512-xxl-0939524-0.150.pkl        -                                        1
edm2-img64-s-fid                 edm2-img64-s-1073741-0.075.pkl           -                                        1
edm2-img64-m-fid                 edm2-img64-m-2147483-0.060.pkl           -                                        1
edm2-img64-l-fid                 edm2-img64-l-1073741-0.040.pkl           -                                        1
edm2-img64-xl-fid                edm2-img64-xl-0671088-0.040.pkl          -                                        1
edm2-img512-xs-guid-fid          edm2-img512-xs-2147483-0.045.pkl         edm2-img512-xs-uncond-2147483-0.045.pkl  1.40
edm2-img512-xs-guid-dino         edm2-img512-xs-2147483-0.150.pkl         edm2-img512-xs-uncond-2147483-0.150.pkl  1.70
edm2-img512-s-guid-fid           edm2-img512-s-2147483-0.025.pkl          edm2-img512-xs-uncond-2147483-0.025.pkl  1.40
edm2-img512-s-guid-dino          edm2-img512-s-2147483-0.085.pkl          edm2-img512-xs-uncond-2147483-0.085.pkl  1.90
edm2-img512-m-guid-fid           edm2-img512-m-2147483-0.030.pkl          edm2-img512-xs-uncond-2147483-0.030.pkl  1.20
edm2-img512-m-guid-dino          edm2-img512-m-2147483-0.015.pkl          edm2-img512-xs-uncond-2147483-0.015.pkl  2.00
edm2-img512-l-guid-fid           edm2-img512-l-1879048-0.015.pkl          edm2-img512-xs-uncond-2147483-0.015.pkl  1.20
edm2-img512-l-guid-dino          edm2-img512-l-1879048-0.035.pkl          edm2-img512-xs-uncond-2147483-0.035.pkl  1.70
edm2-img512-xl-guid-fid          edm2-img512-xl-1342177-0.020.pkl         edm2-img512-xs-uncond-2147483-0.020.pkl  1.20
edm2-img512-xl-guid-dino         edm2-img512-xl-1342177-0.030.pkl         edm2-img512-xs-uncond-2147483-0.030.pkl  1.70
edm2-img512-xxl-guid-fid         edm2-img512-xxl-0939524-0.015.pkl        edm2-img512-xs-uncond-2147483-0.015.pkl  1.20
edm2-img512-xxl-guid-dino        edm2-img512-xxl-0939524-0.015.pkl        edm2-img512-xs-uncond-2147483-0.015.pkl  1.70
edm2-img512-s-autog-fid          edm2-img512-s-2147483-0.070.pkl          edm2-img512-xs-0134217-0.125.pkl         2.10
edm2-img512-s-autog-dino         edm2-img512-s-2147483-0.120.pkl          edm2-img512-xs-0134217-0.165.pkl         2.45
edm2-img512-xxl-autog-fid        edm2-img512-xxl-0939524-0.075.pkl        edm2-img512-m-0268435-0.155.pkl          2.05
edm2-img512-xxl-autog-dino       edm2-img512-xxl-0939524-0.130.pkl        edm2-img512-m-0268435-0.205.pkl          2.30
edm2-img512-s-uncond-autog-fid   edm2-img512-s-uncond-2147483-0.070.pkl   edm2-img512-xs-uncond-0134217-0.110.pkl  2.85
edm2-img512-s-uncond-autog-dino  edm2-img512-s-uncond-2147483-0.090.pkl   edm2-img512-xs-uncond-0134217-0.125.pkl  2.90
edm2-img64-s-autog-fid           edm2-img64-s-1073741-0.045.pkl           edm2-img64-xs-0134217-0.110.pkl          1.70
edm2-img64-s-autog-dino          edm2-img64-s-1073741-0.105.pkl           edm2-img64-xs-0134217-0.175.pkl          2.20
"""


def _parse_table(text: str) -> Dict[str, Preset]:
    presets = {}
    for line in text.strip().splitlines():
        name, net, gnet, guidance = line.split()
        presets[name] = Preset(name, net, None if gnet == "-" else gnet, float(guidance))
    return presets


PRESETS: Dict[str, Preset] = _parse_table(_TABLE)


def resolve_preset(name: str, models_dir: Union[str, os.PathLike, None]) -> Tuple[Path, Optional[Path], float]:
    """(main snapshot path, guiding snapshot path or None, guidance weight) of a preset, in ``models_dir``.

    Raises EDM2Error for an unknown name (listing the known ones), a missing folder, or missing
    files (naming exactly which files to fetch, and from where).
    """
    if name not in PRESETS:
        raise EDM2Error(f"--preset: unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if models_dir is None:
        raise EDM2Error(f"--preset {name} needs --models DIR: the folder holding its snapshot files "
                        f"({_files_of(preset)}, from {MODEL_ROOT}/)")
    folder = Path(models_dir)
    if not folder.is_dir():
        raise EDM2Error(f"--models: {str(folder)!r} is not a folder")
    missing = [f for f in (preset.net, preset.gnet) if f is not None and not (folder / f).is_file()]
    if missing:
        urls = " ".join(f"{MODEL_ROOT}/{f}" for f in missing)
        raise EDM2Error(f"--preset {name}: missing in {str(folder)!r}: {', '.join(missing)}; download "
                        f"them into that folder, e.g. `wget -P {folder} {urls}`")
    return folder / preset.net, (folder / preset.gnet if preset.gnet else None), preset.guidance


def _files_of(preset: Preset) -> str:
    return " and ".join(f for f in (preset.net, preset.gnet) if f)


# --------------------------------------------------------------------------- the checkout

_MARKERS = ("training/networks_edm2.py", "torch_utils/persistence.py", "dnnlib/__init__.py")


def find_checkout(path: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The EDM2 checkout at ``path``, else at $AG_EDM2_PATH, else None (neither given).

    Raises EDM2Error when the path given is missing or is not an NVlabs/edm2 checkout.
    """
    source = "--edm2"
    if path is None or path == "":
        path = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
        if path is None:
            return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise EDM2Error(f"{source}: {str(folder)!r} is not a folder; pass the path of an NVlabs/edm2 checkout "
                        "(git clone https://github.com/NVlabs/edm2)")
    missing = [m for m in _MARKERS if not (folder / m).is_file()]
    if missing:
        raise EDM2Error(f"{source}: {str(folder)!r} is not an NVlabs/edm2 checkout (no {', '.join(missing)})")
    return folder.resolve()


def use_checkout(folder: Path) -> None:
    """Make the checkout's packages importable (first on sys.path), for unpickling and for its encoders.

    Stays in effect for the process: unpickled objects import from it later too (the VAE
    encoder loads ``dnnlib`` when it first decodes).
    """
    entry = str(folder)
    if entry not in sys.path:
        sys.path.insert(0, entry)
    for name in ("dnnlib", "torch_utils", "training"):
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin is not None and not Path(origin).resolve().is_relative_to(folder):
            raise EDM2Error(f"--edm2: a module {name!r} from {origin} is already imported; the checkout's own "
                            "cannot be used in this process")
    importlib.invalidate_caches()


# --------------------------------------------------------------------------- snapshots


def load_snapshot(path: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
                  allow_pickle: bool = False, flag: str = "--net"):
    """Load an EDM2 snapshot pickle: its ``ema`` network and its ``encoder``.

    Args:
        path: the snapshot ``.pkl`` file.
        device: where the network goes.
        allow_pickle: must be True: a snapshot is a pickle, and loading it runs the code it names.
        flag: the command-line flag named in error messages.

    Returns:
        (network, encoder): the network in eval mode on ``device``, and the encoder, or None where
        the snapshot has none (a pixel-space model).

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: ``allow_pickle`` is False.
        EDM2Error: the EDM2 code needed to unpickle it is not importable (pass ``--edm2``).
        CheckpointError: any other unusable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: snapshot file not found: {str(path)!r}")
    if not allow_pickle:
        raise UnsafeCheckpointError(f"{flag}: {path} is an EDM2 snapshot, a pickle: loading it runs code the file "
                                    "names.  Pass --allow-pickle (allow_pickle=True) for files you trust.")
    try:
        data = _full_unpickle(path, "cpu")  # torch.save files and plain pickles (EDM2 snapshots)
    except (ModuleNotFoundError, ImportError) as exc:
        raise EDM2Error(f"{flag}: unpickling {path.name} needs the EDM2 code ({exc}); pass --edm2 PATH (an "
                        f"NVlabs/edm2 checkout) or set ${ENV_VAR}") from None
    except Exception as exc:  # a damaged file fails in many ways, each the file's fault
        raise CheckpointError(f"{flag}: {path}: not a readable EDM2 snapshot ({type(exc).__name__}: {exc})") from None
    if isinstance(data, torch.nn.Module):
        net, encoder = data, None
    elif isinstance(data, dict) and isinstance(data.get("ema"), torch.nn.Module):
        net, encoder = data["ema"], data.get("encoder")
    else:
        raise CheckpointError(f"{flag}: {path}: holds a {type(data).__name__}"
                              f"{' without an ema network' if isinstance(data, dict) else ''}, not an EDM2 snapshot")
    return net.to(device).eval().requires_grad_(False), encoder


def _is_latent(encoder) -> bool:
    # The VAE encoder of latent models names its VAE; the pixel one has nothing to load.
    return hasattr(encoder, "vae_name")


def prepare_encoder(encoder, device) -> object:
    """Initialize a snapshot's encoder on ``device`` before any sampling, as the reference does.

    For the latent models' VAE encoder this loads the VAE decoder through ``diffusers``; if
    diffusers or the VAE weights are missing, an EDM2Error says which and how to get it, so no
    run ever writes undecoded latents.  The reference's decoding batch size is kept.
    """
    if encoder is None:
        return None
    if _is_latent(encoder) and importlib.util.find_spec("diffusers") is None:
        raise EDM2Error("decoding this latent model's samples needs the `diffusers` package for its VAE "
                        f"({getattr(encoder, 'vae_name', '?')}): pip install \".[edm2]\" (or pip install diffusers)")
    init = getattr(encoder, "init", None)
    if callable(init):
        try:
            init(torch.device(device))
        except Exception as exc:
            if _is_latent(encoder):
                raise EDM2Error(
                    f"cannot load the VAE {encoder.vae_name!r} that decodes this model's latents "
                    f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}).  "
                    "EDM2 fetches it from the Hugging Face hub into its cache (DNNLIB_CACHE_DIR, default "
                    "~/.cache/dnnlib/diffusers); on a machine without internet, fetch it once elsewhere "
                    "(huggingface-cli download " + f"{encoder.vae_name}) and copy that cache over"
                ) from None
            raise EDM2Error(f"cannot initialize the snapshot's encoder {type(encoder).__name__}: {exc}") from None
    if hasattr(encoder, "batch_size"):
        encoder.batch_size = ENCODER_BATCH_SIZE
    return encoder

