"""2-D toy problem for autoguidance: exact ground-truth tree distributions."""

from .distribution import CLASSES, TREE_LEVELS, GaussianMixture, tree_depths, tree_mixture

__all__ = ["GaussianMixture", "tree_mixture", "tree_depths", "CLASSES", "TREE_LEVELS"]
