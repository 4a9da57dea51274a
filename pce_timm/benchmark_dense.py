"""Dense section of ``scripts/benchmark.py``: the detector and the segmenter of the dense recipes
(``scripts/configs/dense_*.yaml``) with a PCE-ResNet-18 backbone next to the same model with no PCE stages (the
dense ResNet-18 of the same widths), timed in the same interleaved rounds as the models section.

The detector (Faster R-CNN + FPN) is timed through :class:`DetectorCase`: a forward in eval mode is its
inference (boxes out), a training step is its loss (torchvision's losses on fixed boxes) and backward. MACs
(``torch.utils.flop_counter``: convs and matmuls) are per image of one eval forward of the timed batch.
"""
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .benchmark import Case
from .benchmark_models import count_gmacs

__all__ = ['DENSE_BACKBONE_KWARGS', 'DetectorCase', 'dense_cases']

# the dense recipes' backbone (scripts/configs/dense_*.yaml); the dense twin adds pce_stages=()
DENSE_BACKBONE_KWARGS: Dict[str, Any] = dict(channels=(16, 32, 64, 128), pce_stages=(1, 2), patch_size=(8, 4, 2, 2),
                                             num_experts=4, top_k=1)


class DetectorCase(nn.Module):
    """A torchvision detector as a benchmark case: ``forward(x)`` gives boxes in eval mode and the summed
    losses against two fixed boxes per image in train mode."""

    def __init__(self, detector: nn.Module, size: int):
        super().__init__()
        self.detector = detector
        s = size
        self.boxes = torch.tensor([[0.1 * s, 0.1 * s, 0.4 * s, 0.5 * s], [0.5 * s, 0.45 * s, 0.9 * s, 0.9 * s]])
        self.labels = torch.tensor([1, 2])

    def forward(self, x: torch.Tensor):
        images = list(x)
        if not self.training:
            return self.detector(images)
        targets = [{'boxes': self.boxes, 'labels': self.labels} for _ in images]
        return sum(self.detector(images, targets).values())


def dense_cases(size: int = 128, batch_size: int = 8, num_classes: int = 11) -> List[Case]:
    """Faster R-CNN and Unet, each dense twin right before its PCE model (the PCE case's reference)."""
    from pce_timm.tasks import create_detector, create_segmenter

    builders = {
        'fasterrcnn': lambda **kw: DetectorCase(create_detector('pce_resnet18', num_classes, 'fasterrcnn',
                                                                img_size=size, **kw), size),
        'unet': lambda **kw: create_segmenter('pce_resnet18', num_classes, 'unet', **kw),
    }
    cases = []
    for arch, build in builders.items():
        dense_name, pce_name = f'{arch} resnet18 (dense twin)', f'{arch} pce_resnet18'
        for name, kwargs, role in ((dense_name, dict(DENSE_BACKBONE_KWARGS, pce_stages=()), 'dense'),
                                   (pce_name, DENSE_BACKBONE_KWARGS, 'pce')):
            torch.manual_seed(0)
            model = build(**kwargs)
            info = {'role': role, 'baseline': None if role == 'dense' else dense_name,
                    'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
                    'gmacs': count_gmacs(model, size, batch_size=batch_size)}
            cases.append(Case(name, lambda m=model: m, info, {dense_name: 1.0}))
    return cases
