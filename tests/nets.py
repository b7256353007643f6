"""Small networks shared by the tests (importable because conftest.py's folder is on sys.path)."""

from torch import nn


def paper_mlp(depth: int = 3, hidden: int = 100) -> nn.Sequential:
    """The paper's Section 4.1 network with plain nn.Linear layers, in float64.

    Flatten, 784 - hidden x depth - 10, a sigmoid after each hidden Linear.
    """
    sizes = [784] + [hidden] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    layers.append(nn.Linear(sizes[-1], 10))
    return nn.Sequential(*layers).double()
