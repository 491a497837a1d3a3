"""Build script for ag_kernels.

The Python package (PyTorch reference and Triton backends) always installs.  The compiled
extension ``ag_kernels._C`` is built from ``csrc/`` when that folder holds sources: the C++
(CPU) part always, the CUDA part only when torch is a CUDA build and CUDA_HOME is found.
Environment switches: AG_KERNELS_NO_EXT=1 skips the extension; AG_KERNELS_CUDA=0/1 forces the
CUDA part off/on.  Build with ``pip install --no-build-isolation .`` so that the extension is
compiled against the torch already installed (an isolated build would fetch another torch).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"ag_kernels setup: {msg}")


def extension_modules():
    """(ext_modules, cmdclass) for ag_kernels._C, or ([], {}) with the reason printed."""
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not cpp and not cu:
        _say("no sources in csrc/: skipping the compiled extension (backends torch and triton only)")
        return [], {}
    if os.environ.get("AG_KERNELS_NO_EXT") == "1":
        _say("AG_KERNELS_NO_EXT=1: skipping the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        _say(f"torch is not importable at build time ({exc}); install torch first and build with "
             "--no-build-isolation. Skipping the compiled extension.")
        return [], {}
    force = os.environ.get("AG_KERNELS_CUDA")
    if force == "0":
        use_cuda, why = False, "AG_KERNELS_CUDA=0"
    elif not cu:
        use_cuda, why = False, "no .cu sources in csrc/"
    elif force == "1":
        use_cuda, why = True, "AG_KERNELS_CUDA=1"
    elif not torch.version.cuda:
        use_cuda, why = False, f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        use_cuda, why = False, "CUDA_HOME / nvcc not found"
    else:
        use_cuda, why = True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
    _say(f"CUDA part {'built' if use_cuda else 'skipped'}: {why}")
    # The C++ standard is left to torch.utils.cpp_extension, which passes the one its headers need.
    # -Wno-psabi: GCC notes on passing SIMD vectors by value.  -ffp-contract=off: the CPU kernel's
    # AVX2/AVX-512 variants must not fuse a*b+c into an FMA, so that every variant rounds the same.
    args = {"cxx": ["-O3", "-Wno-psabi", "-ffp-contract=off"]}
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is an OpenMP loop compiled into our code: without -fopenmp it runs on
        # one thread.  libgomp resolves to the copy torch has already loaded.
        args["cxx"].append("-fopenmp")
        link.append("-fopenmp")
    else:
        _say("OpenMP not used: the CPU kernels run on one thread")
    if use_cuda:
        args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        ext = CUDAExtension("ag_kernels._C", cpp + cu, extra_compile_args=args, extra_link_args=link)
    else:
        ext = CppExtension("ag_kernels._C", cpp, extra_compile_args=args, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="ag_kernels",
    version="0.1.0",
    description="Fused guided-sampler kernels for autoguidance and classifier-free guidance (EDM samplers)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ag_kernels", "ag_kernels.*"]),
    python_requires=">=3.9",
    # A range that the installed torch satisfies: install torch first (see README) so that pip
    # does not fetch a multi-GB CUDA build.
    install_requires=["torch>=2.4", "numpy", "tqdm", "pillow", "matplotlib"],
    # The toy experiment's trained models (small weights-only checkpoints) and their training log.
    package_data={"ag_kernels.toy": ["weights/*.pt", "weights/*.json"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["triton>=3.0", "pytest", "pytest-benchmark", "ninja"],
        # Decoding EDM2's latent (img512) models: the VAE is loaded through diffusers.
        "edm2": ["diffusers>=0.25"],
        # The manual: `mkdocs build --strict` (CI) or `mkdocs serve`; API pages from the docstrings.
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ag-kernels=ag_kernels.commands.main:entry"]},
)
