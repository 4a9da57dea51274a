"""Routing pictures on dense-task images: each PCE layer's patch grid coloured by its top-1 expert over the
canvas (:func:`pce_timm.analysis.figures.plot_assignment_overview`'s colouring), with the image's ground-truth
boxes (detection) or mask outlines (segmentation) drawn on top."""
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from matplotlib.patches import Rectangle

from pce_timm.analysis.figures import plot_assignment_overview, save_figure
from pce_timm.layers import pce_layers

from .data import DenseData, _Transformed, dense_transforms

__all__ = ['write_routing_picture']


@torch.no_grad()
def write_routing_picture(model: nn.Module, data: DenseData, path: Path, device: Any, num_images: int = 4) -> Path:
    """Run ``model`` (eval mode) on the first ``num_images`` eval images and save the picture to ``path``."""
    size = data.img_size[0]
    shown = _Transformed(data.eval, dense_transforms('detection', size, False))  # [0, 1] pixels for display
    items = [shown[i] for i in range(min(num_images, len(shown)))]
    images = torch.stack([image for image, _ in items])
    model.eval()
    if data.task == 'detection':
        model([image.to(device) for image in images])
    else:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        model(((images - mean) / std).to(device))
    layers = {name: layer.routing_stats() for name, layer in pce_layers(model).items()
              if layer.last_router_logits is not None}
    fig = plot_assignment_overview(images, layers, max_images=len(items),
                                   row_labels=[f'val image {i}' for i in range(len(items))])
    axes = np.array(fig.axes[:len(items) * len(layers)]).reshape(len(items), len(layers))
    for row, (_, target) in enumerate(items):
        for ax in axes[row]:
            if data.task == 'detection':
                for box, label in zip(target['boxes'].tolist(), target['labels'].tolist(), strict=True):
                    x0, y0, x1, y1 = box
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor='yellow', linewidth=1))
                    ax.text(x0, y0, data.classes[label], color='yellow', fontsize=5, va='bottom')
            else:
                mask = target.numpy() if torch.is_tensor(target) else np.asarray(target)
                objects = np.where(mask == 255, 0, mask)
                ax.contour(objects > 0, levels=[0.5], colors='yellow', linewidths=0.8)  # pixel (i, j) at (j, i)
    fig.suptitle(f'{data.task}: expert per patch and PCE layer (opacity = router confidence), '
                 f'{"boxes" if data.task == "detection" else "mask outlines"} in yellow', fontsize=9)
    return save_figure(fig, path)
