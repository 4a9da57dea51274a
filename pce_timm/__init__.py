"""pce_timm: Positional Convolution Experts as a timm model zoo.

Importing the package registers every ``pce_*`` model with timm.
"""
__version__ = '0.1.0'

from . import (
    layers,  # noqa: F401
    models,  # noqa: F401
)
