"""Detectors on any timm backbone: torchvision's Faster R-CNN (default), RetinaNet and FCOS on the backbone's
``features_only`` maps through torchvision's FeaturePyramidNetwork, as torchvision's ``BackboneWithFPN`` does
for its own ResNets (anchors, box coders, NMS and losses are torchvision's).

Anchor sizes are fitted to the image size: torchvision's defaults (32-512 px, one size per FPN level) suit
800 px images; here level ``i`` (stride ``s_i``) gets anchors of ``4 * s_i`` px scaled by ``img_size / 128``,
so a 128 px canvas has 16-256 px anchors (Fashion-MNIST items of 20-60 px fall on the stride-8 and -16 levels).
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

import pce_timm  # noqa: F401  (registers the pce_* models with timm)
from pce_timm.train.flags import DETECTION_ARCHS

__all__ = ['TimmBackboneWithFPN', 'create_detector', 'DETECTION_ARCHS', 'anchor_sizes']



class TimmBackboneWithFPN(nn.Module):
    """A timm ``features_only`` model + torchvision FPN; ``out_channels`` as torchvision's detectors expect.

    Args:
        body: a timm features_only model.
        out_channels: FPN channels.
        extra: 'pool' (LastLevelMaxPool, Faster R-CNN) or 'p6p7' (LastLevelP6P7 on the FPN output: RetinaNet
            / FCOS, as torchvision builds them).
    """

    def __init__(self, body: nn.Module, out_channels: int = 128, extra: str = 'pool'):
        super().__init__()
        self.body = body
        extra_blocks = LastLevelMaxPool() if extra == 'pool' else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(list(body.feature_info.channels()), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        reductions = tuple(body.feature_info.reduction())
        extra_levels = (2,) if extra == 'pool' else (2, 4)  # the pooled level; P6 and P7
        self.strides = reductions + tuple(reductions[-1] * f for f in extra_levels)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def anchor_sizes(strides: Sequence[int], img_size: int) -> Tuple[Tuple[int, ...], ...]:
    """One anchor size per FPN level: ``4 * stride * img_size / 128`` px (see the module docstring)."""
    return tuple((max(8, round(4 * s * img_size / 128)),) for s in strides)


def create_detector(
        backbone: str,
        num_classes: int,
        arch: str = 'fasterrcnn',
        img_size: int = 128,
        pretrained_backbone: bool = False,
        in_chans: int = 3,
        fpn_channels: int = 128,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        image_mean: Sequence[float] = timm.data.IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = timm.data.IMAGENET_DEFAULT_STD,
        box_head_dim: int = 256,
        detector_kwargs: Optional[Dict[str, Any]] = None,
        **model_kwargs: Any,
) -> nn.Module:
    """A torchvision detector on the timm model ``backbone``.

    ``model(images, targets)`` in train mode returns torchvision's loss dict; in eval mode a list of
    ``{'boxes', 'scores', 'labels'}``. Images are float [0, 1] tensors; the detector's own transform
    normalises them (``image_mean`` / ``image_std``) and keeps them at ``img_size`` (no 800 px resize).

    Args:
        num_classes: including the background (index 0), as torchvision counts.
        arch: ``fasterrcnn``, ``retinanet`` or ``fcos``.
        img_size: the training / eval image size; anchors and the internal resize follow it.
        out_indices: the backbone stages fed to the FPN (strides 4-32 for a ResNet).
        box_head_dim: Faster R-CNN's box head width (torchvision: 1024 for 800 px COCO images; the default 256
            suits a few objects on small canvases and costs a quarter of the head's compute).
        detector_kwargs: further arguments of torchvision's detector class; Faster R-CNN's defaults here are
            sized for small images (1000 / 500 RPN proposals before / after NMS in training, 500 / 300 in
            eval, 128 sampled boxes per image), every one overridable.
        model_kwargs: go to ``timm.create_model`` (``pce_stages``, ``patch_size``, ``channels``, ...).

    Raises:
        ValueError: an unknown ``arch`` or a bad ``num_classes``.
    """
    if arch not in DETECTION_ARCHS:
        raise ValueError(f'arch: got {arch!r}; accepted: {", ".join(DETECTION_ARCHS)}')
    if num_classes < 2:
        raise ValueError(f'num_classes: got {num_classes}; accepted: >= 2 (the background is class 0)')
    body = timm.create_model(backbone, features_only=True, out_indices=tuple(out_indices),
                             pretrained=pretrained_backbone, in_chans=in_chans, **model_kwargs)
    fpn = TimmBackboneWithFPN(body, fpn_channels, extra='pool' if arch == 'fasterrcnn' else 'p6p7')
    sizes = anchor_sizes(fpn.strides, img_size)
    mean, std = list(image_mean)[:in_chans], list(image_std)[:in_chans]
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f'image_mean / image_std: need {in_chans} values (in_chans), got {mean} / {std}')
    common = dict(min_size=img_size, max_size=img_size, image_mean=mean, image_std=std)
    if arch == 'fasterrcnn':
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        small = dict(rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
                     rpn_post_nms_top_n_test=300, box_batch_size_per_image=128)
        resolution = 7  # torchvision's MultiScaleRoIAlign output size
        box_head = TwoMLPHead(fpn_channels * resolution ** 2, box_head_dim)
        model = FasterRCNN(fpn, num_classes=None, rpn_anchor_generator=anchors, box_head=box_head,
                           box_predictor=FastRCNNPredictor(box_head_dim, num_classes),
                           **common, **{**small, **(detector_kwargs or {})})
    elif arch == 'retinanet':
        scaled = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for (s,) in sizes)
        anchors = AnchorGenerator(scaled, ((0.5, 1.0, 2.0),) * len(sizes))
        model = RetinaNet(fpn, num_classes=num_classes, anchor_generator=anchors, **common, **(detector_kwargs or {}))
    else:
        anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
        model = FCOS(fpn, num_classes=num_classes, anchor_generator=anchors, **common, **(detector_kwargs or {}))
    model.arch = arch
    return model
