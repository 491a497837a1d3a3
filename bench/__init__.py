"""The ag_kernels benchmark suite (pytest-benchmark); ``python -m bench`` runs the standard set."""
