"""Segmenters on any timm backbone: segmentation_models_pytorch's Unet, FPN and DeepLabV3+ with the
backbone as a ``tu-<name>`` encoder (smp's TimmUniversalEncoder: ``features_only=True``, out_indices 0-4).

Every pce_resnet* model works with all three. DeepLabV3+ asks its encoder for ``output_stride`` 16 (or 8),
which timm's ResNet gets by dilating its last stage (last two) instead of striding; PCE layers have no dilated
experts, so the dilated stages must be dense: a PCE-ResNet with PCE in stage 3 (the zoo default,
``pce_stages=(2, 3)``) takes DeepLabV3+ at ``output_stride`` 16 only with ``pce_stages`` within (0, 1, 2),
and :func:`create_segmenter` says so.

The ViT hybrids (``pce_vit_hybrid_*``) work with all three through their ``features_only`` pyramid
(:class:`pce_timm.models.pce_vit_hybrid.PCEHybridFeatures`): the CNN stem's maps at strides 2, 4, 8, the ViT's
output at 16 and, for smp's fifth level, that map max-pooled to 32. DeepLabV3+ at ``output_stride`` 16 takes the
ViT's map unpooled as its deepest feature; ``output_stride`` 8 dilates the CNN's ``layer3`` (the ViT then runs on
stride-8 tokens), so it needs ``pce_stages`` within (0, 1). smp's DPT takes them too (``smp.DPT('tu-...')``: the
ViT's block features). Backbones whose features all share one stride (timm's plain ViTs) raise a ValueError.
"""
from typing import Any, Optional, Sequence

import segmentation_models_pytorch as smp
import timm
import torch.nn as nn

import pce_timm  # noqa: F401  (registers the pce_* models with timm)

__all__ = ['create_segmenter', 'SEGMENTATION_ARCHS']

# the same names as the dense parser's --arch choices (pce_timm.train.flags.SEGMENTATION_ARCH_NAMES)
SEGMENTATION_ARCHS = {'unet': smp.Unet, 'fpn': smp.FPN, 'deeplabv3plus': smp.DeepLabV3Plus}


def _check_backbone(backbone: str) -> None:
    try:
        with timm.layers.set_layer_config(scriptable=False):
            probe = timm.create_model(backbone, features_only=True, pretrained=False, device='meta')
    except Exception as e:  # an unknown name: timm's own message
        raise ValueError(f'backbone: {backbone!r} cannot be built as a timm features_only model: {e}') from e
    reductions = list(probe.feature_info.reduction())
    if len(set(reductions)) < len(reductions):
        raise ValueError(
            f'backbone: {backbone!r} gives features at strides {reductions}; segmentation_models_pytorch encoders '
            f'need a pyramid of strides 2-4-8-16-32 (a ResNet-like backbone such as pce_resnet18 or resnet18, or a '
            f'pce_vit_hybrid_*); smp.DPT takes single-stride ViTs')


def _unet_decoder_channels(arch: str, decoder_channels: Sequence[int]) -> tuple:
    if arch != 'unet':
        raise ValueError(f'decoder_channels: only unet takes decoder widths, got arch {arch!r}; drop '
                         f'decoder_channels or use arch unet')
    widths = tuple(decoder_channels)
    if len(widths) != 5 or not all(isinstance(w, int) and w > 0 for w in widths):
        raise ValueError(f'decoder_channels: got {list(widths)}; accepted: five positive integers, one per Unet '
                         f'decoder block, deepest first (smp default [256, 128, 64, 32, 16])')
    return widths


def create_segmenter(
        backbone: str,
        num_classes: int,
        arch: str = 'unet',
        in_chans: int = 3,
        output_stride: Optional[int] = None,
        pretrained_backbone: bool = False,
        decoder_channels: Optional[Sequence[int]] = None,
        **model_kwargs: Any,
) -> nn.Module:
    """An smp segmenter (logits [B, num_classes, H, W] at the input size) on the timm model ``backbone``.

    Args:
        backbone: a timm name (``pce_resnet18``, ``resnet18``, ...).
        arch: ``unet``, ``fpn`` or ``deeplabv3plus``.
        in_chans: image channels (1 or 3 ...).
        output_stride: DeepLabV3+'s encoder output stride (8 or 16, default 16); Unet / FPN use 32.
        pretrained_backbone: timm's pretrained weights for the encoder.
        decoder_channels: Unet only: the widths of its five decoder blocks, deepest first (None: smp's
            ``(256, 128, 64, 32, 16)``). The decoder costs most of a narrow backbone's Unet step: at 128 px with
            widths 16-128, ``(128, 64, 32, 16, 16)`` about halves it.
        model_kwargs: go to ``timm.create_model`` (e.g. ``pce_stages``, ``patch_size``, ``num_experts``).

    Raises:
        ValueError: unknown ``arch``; a backbone without a feature pyramid; an output stride that would dilate
            a PCE stage (the message lists the ``pce_stages`` each output stride allows); ``decoder_channels``
            for another arch than Unet, or not five positive widths.
    """
    if arch not in SEGMENTATION_ARCHS:
        raise ValueError(f'arch: got {arch!r}; accepted: {", ".join(SEGMENTATION_ARCHS)}')
    if num_classes < 1:
        raise ValueError(f'num_classes: got {num_classes}; accepted: an integer >= 1')
    _check_backbone(backbone)
    kwargs = dict(encoder_name=f'tu-{backbone}', encoder_weights='imagenet' if pretrained_backbone else None,
                  in_channels=in_chans, classes=num_classes, **model_kwargs)
    if arch == 'deeplabv3plus':
        kwargs['encoder_output_stride'] = output_stride or 16
    elif output_stride not in (None, 32):
        raise ValueError(f'output_stride: {arch} uses the encoder at output stride 32, got {output_stride}; '
                         f'only deeplabv3plus takes 8 or 16')
    if decoder_channels is not None:
        kwargs['decoder_channels'] = _unet_decoder_channels(arch, decoder_channels)
    return SEGMENTATION_ARCHS[arch](**kwargs)
