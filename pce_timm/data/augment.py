"""The PCE paper's image augmentations, as torchvision-style callables on `[C, H, W]` float tensors.

Both act on tensors with values in [0, 1], i.e. after `ToTensor` and BEFORE `Normalize`; the transform builder
(`transforms.py`) inserts them there. They draw their randomness from torch's global generator, which the
DataLoader seeds per worker.
"""
import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ['ChannelBoost', 'BlackPatches']


def check_prob(name: str, p: float) -> float:
    if not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f'{name} must be a probability in [0, 1], got {p!r}.')
    return float(p)


def _check_range(name: str, value: Sequence[float], low: float, high: float, integer: bool = False) -> tuple:
    kind = 'integers' if integer else 'numbers'
    ok = (
        isinstance(value, Sequence) and len(value) == 2
        and all(isinstance(v, numbers.Integral if integer else numbers.Real) for v in value)
        and low <= value[0] <= value[1] <= high
    )
    if not ok:
        raise ValueError(
            f'{name} must be a (min, max) pair of {kind} with {low} <= min <= max <= {high}, got {value!r}.')
    return tuple(value)


class ChannelBoost:
    """With probability `p`, multiply one randomly chosen channel by a factor drawn from `factor`, then clip to 1.

    Emphasises one colour channel so that experts cannot rely on a fixed colour balance. Images with a single
    channel are returned unchanged (there is no other channel to boost against).

    Args:
        p: Probability of boosting an image.
        factor: `(min, max)` of the uniform multiplier, `1 <= min <= max`.
    """

    def __init__(self, p: float = 0.5, factor: tuple[float, float] = (1.2, 2.0)):
        self.p = check_prob(f'{type(self).__name__} p', p)
        self.factor = _check_range(f'{type(self).__name__} factor', factor, 1.0, math.inf)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Boost `img` `[C, H, W]` (values in [0, 1]); returns a new tensor or `img` itself when not applied."""
        _check_image(img)
        if img.shape[0] < 2 or self.p == 0.0 or torch.rand(()) >= self.p:
            return img
        channel = int(torch.randint(img.shape[0], ()))
        low, high = self.factor
        factor = low + (high - low) * float(torch.rand(()))
        out = img.clone()
        out[channel] = (out[channel] * factor).clamp_(max=1.0)
        return out

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p}, factor={self.factor})'


class BlackPatches:
    """With probability `p`, set a random number of random rectangles to 0 (black, before normalisation).

    Args:
        p: Probability of applying to an image.
        num_patches: `(min, max)` number of rectangles, inclusive, `1 <= min <= max`.
        patch_size: `(min, max)` side length of a rectangle as a fraction of the image side, in (0, 1];
            height and width are drawn independently.
    """

    def __init__(
            self,
            p: float = 0.5,
            num_patches: tuple[int, int] = (1, 4),
            patch_size: tuple[float, float] = (0.1, 0.3),
    ):
        self.p = check_prob(f'{type(self).__name__} p', p)
        self.num_patches = _check_range(f'{type(self).__name__} num_patches', num_patches, 1, math.inf, integer=True)
        self.patch_size = _check_range(f'{type(self).__name__} patch_size', patch_size, 0.0, 1.0)
        if self.patch_size[0] <= 0:
            raise ValueError(f'{type(self).__name__} patch_size must be in (0, 1], got {patch_size!r}.')

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Black out patches of `img` `[C, H, W]`; returns a new tensor or `img` itself when not applied."""
        _check_image(img)
        if self.p == 0.0 or torch.rand(()) >= self.p:
            return img
        out = img.clone()
        height, width = img.shape[-2:]
        count = int(torch.randint(self.num_patches[0], self.num_patches[1] + 1, ()))
        low, high = self.patch_size
        for _ in range(count):
            ph = max(1, round(height * (low + (high - low) * float(torch.rand(())))))
            pw = max(1, round(width * (low + (high - low) * float(torch.rand(())))))
            top = int(torch.randint(height - ph + 1, ()))
            left = int(torch.randint(width - pw + 1, ()))
            out[..., top:top + ph, left:left + pw] = 0
        return out

    def __repr__(self) -> str:
        return f'{type(self).__name__}(p={self.p}, num_patches={self.num_patches}, patch_size={self.patch_size})'


def _check_image(img: torch.Tensor) -> None:
    if not isinstance(img, torch.Tensor) or img.ndim != 3:
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f'expected a [C, H, W] tensor (after ToTensor, before Normalize), got {shape}.')
