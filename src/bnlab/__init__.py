"""bnlab: a reference implementation of Batch Normalization (Ioffe & Szegedy, 2015).

Submodules:
    functional  the Batch Normalizing Transform as pure tensor math (Algorithm 1)
    nn          drop-in replacements for torch.nn.BatchNorm1d/2d/3d, converters
"""

__version__ = "0.1.0"
