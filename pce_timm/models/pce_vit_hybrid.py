"""PCE-ViT hybrids: the stem and first three stages of a PCE-ResNet (stride 16) feeding a Vision Transformer.

Built like timm's own hybrids (``timm.models.vision_transformer_hybrid``): a features_only CNN backbone,
timm's :class:`~timm.layers.HybridEmbed` projecting its last feature map to tokens (1x1 patches), and
timm's :class:`~timm.models.vision_transformer.VisionTransformer` with a class token, 'token' pooling and a
linear head. ``forward_features`` returns tokens [B, 1 + N, C] (NLC) like every timm ViT.

PCE sits in backbone stages 1 and 2 (``pce_stages=(1, 2)``), the last two the ViT sees; with the PCE-ResNet's
default ``patch_grid`` they route a 7x7 and a 2x2 patch grid at any input size (at 224 px 4 px and 7 px patches,
as the earlier pixel default did). The PCE-ResNet arguments (``num_experts``, ``top_k``, ``router``,
``pce_stages``, ``patch_size``, ``patch_grid``, ``choice``, ``balance``, ...) go to the backbone, every other
argument to the ViT.
``dynamic_img_size=True`` by default: the backbone takes any input size and the position embedding is resampled
to its token grid.
"""
import math
from functools import partial
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import HybridEmbed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import checkpoint_filter_fn

from ._pretrained import default_pretrained_tag
from ._timm_compat import record_model_args
from .pce_resnet import PCE_ARCH_ARGS, _explain_weights_error, pce_arch_args, pce_resnet18, pce_resnet50

__all__ = ['PCEHybridEmbed', 'PCEVisionTransformer']

BACKBONE_OUT_INDEX = 3  # feature index 3 = the output of stage 2 (layer3), stride 16
BACKBONE_DEFAULTS = dict(pce_stages=(1, 2))


class PCEHybridEmbed(HybridEmbed):
    """timm's HybridEmbed, with the backbone's geometry taken from its ``feature_info`` instead of a probe
    forward pass, and the token grid of any input size rounded up as the backbone rounds (``ceil(size / r)``:
    every stride-2 step of a ResNet pads), so ``forward_intermediates`` reshapes correctly at odd sizes.
    """

    def _init_backbone(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 1,
            feature_size: Optional[Union[int, Tuple[int, int]]] = None,
            feature_ratio: Optional[Union[int, Tuple[int, int]]] = None,
            feature_dim: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        feature_ratio = to_2tuple(feature_ratio or self.backbone.feature_info.reduction()[-1])
        if feature_size is None:
            feature_size = tuple(math.ceil(s / r) for s, r in zip(img_size, feature_ratio, strict=True))
        feature_size = to_2tuple(feature_size)
        feature_dim = feature_dim or self.backbone.feature_info.channels()[-1]
        grid_size = tuple(f // p for f, p in zip(feature_size, patch_size, strict=True))
        return img_size, patch_size, feature_size, feature_ratio, feature_dim, grid_size, grid_size[0] * grid_size[1]

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        feat_size = [math.ceil(s / r) for s, r in zip(img_size, self.feature_ratio, strict=True)]
        if self.dynamic_img_pad:
            return math.ceil(feat_size[0] / self.patch_size[0]), math.ceil(feat_size[1] / self.patch_size[1])
        return feat_size[0] // self.patch_size[0], feat_size[1] // self.patch_size[1]


class PCEVisionTransformer(VisionTransformer):
    """timm's VisionTransformer; ``no_weight_decay`` adds the backbone's cosine-router keys (see PCEResNet).

    Parameter groups are the ViT's: the whole CNN backbone, routers included, is its 'stem' group.
    """

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        router_keys = {name for name, _ in self.named_parameters() if name.endswith('.router.keys')}
        return super().no_weight_decay() | router_keys


def _create_pce_vit_hybrid(
        variant: str,
        backbone_fn: Callable[..., Any],
        pretrained: bool = False,
        **kwargs: Any,
) -> PCEVisionTransformer:
    default_pretrained_tag(variant, pretrained, kwargs)  # says so when the architecture has no released weights
    backbone_args = pce_arch_args(**dict(BACKBONE_DEFAULTS, **{k: kwargs.pop(k) for k in PCE_ARCH_ARGS if k in kwargs}))
    backbone = backbone_fn(
        in_chans=kwargs.get('in_chans', 3),
        features_only=True,
        out_indices=(BACKBONE_OUT_INDEX,),
        feature_cls='list',  # a plain module list up to layer3: flat state-dict keys, scriptable
        device=kwargs.get('device'),
        dtype=kwargs.get('dtype'),
        **backbone_args,
    )
    kwargs.setdefault('patch_size', 1)
    try:
        model = build_model_with_cfg(
            PCEVisionTransformer, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=3, feature_cls='getter'),
            embed_layer=partial(PCEHybridEmbed, backbone=backbone),
            **kwargs,
        )
    except Exception as e:
        if pretrained:
            _explain_weights_error(variant, kwargs, e)
        raise
    record_model_args(model, **backbone_args)
    return model


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.backbone.conv1', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


# No weights are published yet: entries with weights get hf_hub_id=hub_id('<arch>.<tag>') (see ._hub).
default_cfgs = generate_default_cfgs({
    'pce_vit_hybrid_small_r18.untrained': _cfg(),
    'pce_vit_hybrid_base_r50.untrained': _cfg(),
})


@register_model
def pce_vit_hybrid_small_r18(pretrained: bool = False, **kwargs: Any) -> PCEVisionTransformer:
    """ViT-S (384 wide, 12 blocks, 6 heads) on PCE-ResNet-18 stages 0-2 (stride 16), 4 experts top-1."""
    model_args = dict(embed_dim=384, depth=12, num_heads=6, dynamic_img_size=True)
    return _create_pce_vit_hybrid(
        'pce_vit_hybrid_small_r18', pce_resnet18, pretrained, **dict(model_args, **kwargs))


@register_model
def pce_vit_hybrid_base_r50(pretrained: bool = False, **kwargs: Any) -> PCEVisionTransformer:
    """ViT-B (768 wide, 12 blocks, 12 heads) on PCE-ResNet-50 stages 0-2 (stride 16), 4 experts top-1."""
    model_args = dict(embed_dim=768, depth=12, num_heads=12, dynamic_img_size=True)
    return _create_pce_vit_hybrid(
        'pce_vit_hybrid_base_r50', pce_resnet50, pretrained, **dict(model_args, **kwargs))
