"""2-D toy problem for autoguidance: exact ground-truth tree distributions."""

from .distribution import CLASSES, GaussianMixture, tree_mixture

__all__ = ["GaussianMixture", "tree_mixture", "CLASSES"]
