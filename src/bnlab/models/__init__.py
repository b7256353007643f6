"""Model builders with explicit arguments."""

from bnlab.models.inception import InceptionNet, count_parameters, inception_net
from bnlab.models.mlp import SeedBatchedLinear, mnist_mlp

__all__ = ["InceptionNet", "SeedBatchedLinear", "count_parameters", "inception_net", "mnist_mlp"]
