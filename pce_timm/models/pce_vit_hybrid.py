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
to its token grid. The backbone's stage widths ``channels`` go to the backbone too.

Pretrained tags carry their architecture args (:data:`TAG_ARCH_ARGS`, as the PCE-ResNets'), applied whenever the
tag is requested:

- ``pce_vit_hybrid_tiny_d4_r18.fmnist``: Fashion-MNIST (10 classes, 1x28x28 grayscale, the dataset's mean 0.2860 /
  std 0.3530), CIFAR stem, CNN stage widths (16, 32, 64), so 28 px give a 7x7 token grid; PCE in CNN stages 1 and 2
  routing a 4x4 patch grid each, 4 experts, top-1 cosine routing, no attention. Trained by ``make release``
  (scripts/make_release.py with scripts/configs/pce_vit_hybrid_tiny_d4_r18_fmnist_release.yaml); weights on the
  Hub as ``pce-timm/pce_vit_hybrid_tiny_d4_r18.fmnist``; the bare name with ``pretrained=True`` loads it.

The classification model's ``feature_info`` and ``forward_intermediates`` are the ViT's (its blocks, all at stride
16), as for timm's own hybrids (smp's DPT takes them that way). ``features_only=True`` instead gives a feature
pyramid (:class:`PCEHybridFeatures`), so the hybrids are encoders for smp's Unet / FPN / DeepLabV3+ and torchvision's
FPN detectors: the CNN stem's stage outputs at strides 2, 4, 8, the last ViT block's tokens as a map at stride 16,
and that map max-pooled to stride 32 (ViTDet's simple feature pyramid gets its 1/32 level the same way);
``feature_cls='getter'`` still gives timm's block features.
"""
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Format, HybridEmbed, nchw_to, to_2tuple
from timm.models import (
    FeatureInfo,
    build_model_with_cfg,
    checkpoint_seq,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
)
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import checkpoint_filter_fn

from pce_timm.data.registry import FASHION_MNIST_CLASSES

from ._hub import hub_id
from ._pretrained import check_loaded_weights, default_pretrained_tag
from ._timm_compat import record_model_args
from .pce_resnet import (
    PCE_ARCH_ARGS,
    _comparable_arch_value,
    _explain_weights_error,
    _tag_arch_args,
    pce_arch_args,
    pce_resnet18,
    pce_resnet50,
)

__all__ = ['PCEHybridEmbed', 'PCEVisionTransformer', 'PCEHybridFeatures']

# the backbone's feature indices: the stem (act1, stride 2), stages 0-2 (layer1-layer3, strides 4, 8, 16); the ViT
# embeds the last one, features_only also returns the others
BACKBONE_OUT_INDICES = (0, 1, 2, 3)
BACKBONE_DEFAULTS = dict(pce_stages=(1, 2))
# the backbone's arguments: the PCE-ResNet architecture args and its stage widths (no ViT argument has these names)
BACKBONE_ARGS = (*PCE_ARCH_ARGS, 'channels')


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

    def forward_stem(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The backbone's maps [B, C_i, H / r_i, W / r_i] (act1, layer1, layer2, layer3); the last one is embedded."""
        return self.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens from the backbone's last map, as timm's HybridEmbed makes them (pad, 1x1 proj, flatten / NHWC)."""
        _, _, H, W = x.shape
        if self.dynamic_img_pad:
            pad_h = (self.patch_size[0] - H % self.patch_size[0]) % self.patch_size[0]
            pad_w = (self.patch_size[1] - W % self.patch_size[1]) % self.patch_size[1]
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.forward_stem(x)[-1])

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

    def forward_pyramid(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """The CNN stem's maps before the embedded one (act1, layer1, layer2: strides 2, 4, 8) and the last block's
        patch tokens as a map [B, embed_dim, H / 16, W / 16], without the final norm (as timm's features_only).

        The same computation as ``forward_features`` up to its norm, the stem maps kept on the way.
        """
        B, _, height, width = x.shape
        stem = self.patch_embed.forward_stem(x)
        x = self.patch_embed.project(stem[-1])
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        H, W = self.patch_embed.dynamic_feat_size((height, width))
        tokens = x[:, self.num_prefix_tokens:]
        return stem[:-1], tokens.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()


PYRAMID_LEVELS = 5  # act1, layer1, layer2 (the CNN stem), the ViT's map, the ViT's map pooled


class PCEHybridFeatures(nn.Module):
    """``features_only=True`` on the hybrids: a 5-level feature pyramid, NCHW maps, as timm's ResNets give.

    ====== ================================= ======================= ==========
    index  tensor                            stride (output_stride)  channels
    ====== ================================= ======================= ==========
    0      stem ``act1``                     2                       stem width
    1-2    CNN stages ``layer1``, ``layer2``  4, 8                    stage widths
    3      last ViT block's patch tokens      16 (8 at 8)             embed_dim
    4      index 3 max-pooled 2x2             32 (16 at 16, 8 at 8)   embed_dim
    ====== ================================= ======================= ==========

    Level 4 is a parameter-free pooling (ViTDet's simple feature pyramid makes its 1/32 level so), there because
    smp's encoders and the FPN detectors take five levels; ``output_stride=16`` leaves it unpooled (the deepest
    map stays at 16, as a ResNet's dilated last stage does), ``output_stride=8`` dilates the CNN's stage 2
    (``layer3``) so the ViT runs on stride-8 tokens (4x the tokens; that stage must be dense). The final norm and
    the head are pruned (unused in features, and DDP refuses unused parameters). Each out index must be in 0-4,
    increasing, and include 3 or 4: the stem's maps alone are a PCE-ResNet's features (``pce_resnet18``).

    Args:
        model: the hybrid classifier to wrap (pruned in place).
        out_indices: pyramid levels to return, in order.
        output_stride: 32, 16 or 8 (the stride of level 4).
    """

    def __init__(self, model: PCEVisionTransformer, out_indices: Sequence[int] = (0, 1, 2, 3, 4),
                 output_stride: int = 32):
        super().__init__()
        out_indices = _pyramid_indices(out_indices)
        model.prune_intermediate_layers(len(model.blocks), prune_norm=True, prune_head=True)  # every block stays
        self.model = model
        self.out_indices = out_indices
        stem_info = model.patch_embed.backbone.feature_info
        vit_reduction = stem_info.reduction()[-1]
        self.pool_last = 2 * vit_reduction <= output_stride
        last_block = f'blocks.{len(model.blocks) - 1}'
        info = [dict(num_chs=stem_info.channels(i), reduction=stem_info.reduction(i),
                     module=f'patch_embed.backbone.{stem_info.module_name(i)}') for i in range(3)]
        info.append(dict(num_chs=model.embed_dim, reduction=vit_reduction, module=last_block))
        info.append(dict(num_chs=model.embed_dim, reduction=vit_reduction * (2 if self.pool_last else 1),
                         module=last_block))
        self.feature_info = FeatureInfo(info, out_indices)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        stem, grid = self.model.forward_pyramid(x)
        pooled = F.max_pool2d(grid, 2, 2, ceil_mode=True) if self.pool_last else grid  # ceil: ceil(H / 32) rows
        levels = stem + [grid, pooled]
        return [levels[i] for i in self.out_indices]


def _pyramid_indices(out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
    normalized = tuple(i + PYRAMID_LEVELS if isinstance(i, int) and -PYRAMID_LEVELS <= i < 0 else i for i in indices)
    valid = (normalized and all(isinstance(i, int) and 0 <= i < PYRAMID_LEVELS for i in normalized)
             and list(normalized) == sorted(set(normalized)))
    if not valid:
        raise ValueError(
            f'out_indices: got {out_indices!r}; a pce_vit_hybrid features_only model takes increasing indices in '
            f'0-{PYRAMID_LEVELS - 1} (0-2: the CNN stem at strides 2, 4, 8; 3: the ViT at 16; 4: the ViT pooled to 32)')
    if max(normalized) < 3:
        raise ValueError(
            f'out_indices: got {out_indices!r}, only the CNN stem\'s maps, so the ViT would go unused; include 3 '
            f'(the ViT at stride 16) or 4, or take the stem alone from a PCE-ResNet: timm.create_model('
            f"'pce_resnet18', features_only=True, out_indices={normalized}, pce_stages=(1, 2))")
    return normalized


def _create_pce_vit_hybrid(
        variant: str,
        backbone_fn: Callable[..., Any],
        pretrained: bool = False,
        **kwargs: Any,
) -> PCEVisionTransformer:
    tag = default_pretrained_tag(variant, pretrained, kwargs)  # the bare name + pretrained: the best release
    if tag is not None:
        kwargs = dict(kwargs, pretrained_cfg=tag)
    tag_args = _tag_arch_args(variant, kwargs, TAG_ARCH_ARGS)
    kwargs = dict(kwargs, **tag_args)
    kwargs.setdefault('in_chans', _cfg_in_chans(variant, kwargs.get('pretrained_cfg')))
    backbone_kwargs = {k: kwargs.pop(k) for k in BACKBONE_ARGS if k in kwargs}
    backbone_args = dict(pce_arch_args(**dict(BACKBONE_DEFAULTS, **backbone_kwargs)),
                         **{k: v for k, v in backbone_kwargs.items() if k not in PCE_ARCH_ARGS})
    feature_cfg = dict(out_indices=3, feature_cls='getter')  # feature_cls='getter': timm's block features
    stem_args = {}
    if kwargs.get('features_only') and kwargs.get('feature_cls', PCEHybridFeatures) is PCEHybridFeatures:
        # the pyramid; its output stride is what smp's DeepLabV3+ asks for (16 or 8); 8 dilates the backbone's layer3
        output_stride = kwargs.pop('output_stride', 32)
        if output_stride not in (32, 16, 8):
            raise ValueError(f'output_stride must be one of (32, 16, 8), got {output_stride!r}')
        feature_cfg = dict(out_indices=tuple(range(PYRAMID_LEVELS)), feature_cls=PCEHybridFeatures,
                           output_stride=output_stride)
        stem_args = dict(output_stride=output_stride) if output_stride == 8 else {}
    backbone = backbone_fn(
        in_chans=kwargs['in_chans'],
        features_only=True,
        out_indices=BACKBONE_OUT_INDICES,
        feature_cls='list',  # a plain module list up to layer3: flat state-dict keys, scriptable
        device=kwargs.get('device'),
        dtype=kwargs.get('dtype'),
        **backbone_args,
        **stem_args,
    )
    kwargs.setdefault('patch_size', 1)
    try:
        model = build_model_with_cfg(
            PCEVisionTransformer, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=feature_cfg,
            embed_layer=partial(PCEHybridEmbed, backbone=backbone),
            **kwargs,
        )
    except Exception as e:
        if pretrained:
            _explain_weights_error(variant, kwargs, e)
        raise
    record_model_args(model, **backbone_args, **{k: v for k, v in tag_args.items() if k not in BACKBONE_ARGS})
    if pretrained and isinstance(kwargs.get('pretrained_cfg'), str):  # a registry tag (hf-hub: / local-dir: bring
        check_loaded_weights(model, f'{variant}.{kwargs["pretrained_cfg"]}', kwargs.get('cache_dir'),  # their own)
                             normalize=_comparable_arch_value)
    return model


def _cfg_in_chans(variant: str, pretrained_cfg: Any) -> int:
    """The input channels of the pretrained cfg ``create_model`` will use (a tag name, a cfg dict, or the default).

    timm sets ``in_chans`` from it inside ``build_model_with_cfg``, after the backbone is built here.
    """
    if isinstance(pretrained_cfg, dict):
        input_size = pretrained_cfg.get('input_size')
    else:
        cfg = get_pretrained_cfg(f'{variant}.{pretrained_cfg}' if isinstance(pretrained_cfg, str) else variant)
        input_size = cfg.input_size if cfg is not None else None
    return int(input_size[0]) if input_size else 3


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.backbone.conv1', 'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


# The first tag of an architecture is its default. Tags with weights get hf_hub_id=hub_id('<arch>.<tag>') (see
# ._hub) and an entry in TAG_ARCH_ARGS; a '*' keeps 'untrained' the default (the ImageNet-shaped architecture).
default_cfgs = generate_default_cfgs({
    # Fashion-MNIST as pce_timm.data feeds it: 1 grayscale channel, 28 px, the dataset's mean / std, no crop.
    'pce_vit_hybrid_tiny_d4_r18.fmnist': _cfg(
        hf_hub_id=hub_id('pce_vit_hybrid_tiny_d4_r18.fmnist'), num_classes=10, input_size=(1, 28, 28), crop_pct=1.0,
        mean=(0.2860,), std=(0.3530,), label_names=FASHION_MNIST_CLASSES,
        description='Fashion-MNIST classifier (pce_timm dataset fashion_mnist), trained by make release'),
    'pce_vit_hybrid_tiny_d4_r18.untrained*': _cfg(),
    'pce_vit_hybrid_small_r18.untrained': _cfg(),
    'pce_vit_hybrid_base_r50.untrained': _cfg(),
})

# Architecture args of pretrained tags, applied when the tag is requested (as pce_resnet.TAG_ARCH_ARGS; a kwarg the
# caller also passes must agree). Backbone args (BACKBONE_ARGS) go to the PCE-ResNet, the others to the ViT.
TAG_ARCH_ARGS: Dict[str, Dict[str, Any]] = {
    # 28 px: the CIFAR stem keeps stride 4 at layer3, so the ViT sees a 7x7 token grid; PCE in backbone stages 1
    # and 2 (layer2 / layer3: 14 and 7 px maps) routes a 4x4 patch grid in each (4 px and 2 px patches).
    'pce_vit_hybrid_tiny_d4_r18.fmnist': dict(
        stem_type='cifar', channels=(16, 32, 64, 128), pce_stages=(1, 2), patch_grid=4,
        num_experts=4, top_k=1, router='cosine', attention=False, img_size=28),
}


@register_model
def pce_vit_hybrid_tiny_d4_r18(pretrained: bool = False, **kwargs: Any) -> PCEVisionTransformer:
    """ViT-Ti's width (192, 3 heads) at a third of its depth (4 blocks) on PCE-ResNet-18 stages 0-2 (stride 16),
    4 experts top-1. Small enough to train on a CPU: its ``.fmnist`` release trains in minutes on 2 cores."""
    model_args = dict(embed_dim=192, depth=4, num_heads=3, dynamic_img_size=True)
    return _create_pce_vit_hybrid(
        'pce_vit_hybrid_tiny_d4_r18', pce_resnet18, pretrained, **dict(model_args, **kwargs))


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
