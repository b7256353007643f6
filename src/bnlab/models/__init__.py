"""Model builders with explicit arguments."""

from bnlab.models.mlp import SeedBatchedLinear, mnist_mlp

__all__ = ["SeedBatchedLinear", "mnist_mlp"]
