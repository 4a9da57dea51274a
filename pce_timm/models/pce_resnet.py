"""PCE-ResNet: timm's ResNet with Positional Convolution Experts in its last stages.

In a PCE block the block's first 3x3 conv (with the block's stride) is a :class:`~pce_timm.layers.PCEConv2d`:
``conv1`` of a BasicBlock, ``conv2`` of a Bottleneck. The layer holds a BatchNorm + ReLU per expert, so the
norm and activation that followed the dense conv (``bn1``/``act1``, ``bn2``/``act2``) are gone. Everything
else is timm's :class:`~timm.models.resnet.ResNet`: stems, downsampling, stochastic depth, head,
``forward_intermediates``, pruning, grad checkpointing, features_only, ``device`` / ``dtype``, and
``norm_layer`` / ``act_layer`` for the stem and the dense stages (a PCE stage's experts are Conv-BatchNorm2d-ReLU,
so a PCE stage accepts only those and raises for any other).

Defaults of the zoo, and why:
- ``pce_stages=(2, 3)``: PCE in the last two stages, where patches are few and carry meaning; the early,
  high-resolution stages stay dense, which is where PCE's gather/scatter overhead would cost the most.
- ``patch_grid=(7, 7, 2, 2)`` (:data:`DEFAULT_PATCH_GRID`): the routing grid, patches per side of each stage's
  output map; every PCE layer derives its patch size from its map at forward time (``ceil(map / grid)`` px), so
  the layers route a grid at any input size. At 224 px this is the earlier pixel default ``patch_size=(8, 4, 7,
  7)`` in stages 0-2 (stage 2, 14x14 px: a 2x2 grid of 7x7 px patches), and in stage 3 (7x7 px) a 2x2 grid of
  4x4 px patches (the last row and column padded) where 7 px patches made each image one patch; at 28 px with
  the CIFAR stem (stage maps 28 / 14 / 7 / 4 px) stages 2-3 route 2x2 grids. A layer routing one patch (a 1x1
  grid: a 1x1 map, e.g. stage 3 of the ImageNet stem at 28 px) warns, once. Grids stay coarse on purpose: a
  patch's halo window (``patch + 2`` px on a side for a 3x3 conv) must stay close to the patch for the sparse
  path to cost what the dense conv costs (2 px patches, a 7x7 / 4x4 grid at 224 px with windows 4x the patch,
  ran ``pce_resnet18_e8`` at ~0.65x resnet18's throughput; ``scripts/benchmark.py --section grid`` times the
  grids). ``patch_size`` (px of each stage's output map, an int or one per stage) fixes the patches in pixels
  instead and wins when given; every model saved before ``patch_grid`` existed records it, and rebuilds as it
  was. The first block of a stage has stride 2 and sees the stage's input map: its layer's patch is the
  stage's x 2, so its patches cover the same image regions.
- ``top_k=1``: sparse top-1 routing, so a PCE conv costs about what the dense conv costs.
- ``mix_conv=False``: the layer's optional 1x1 mix after the weighted sum of experts is linear, and so is
  the block's next conv (the 3x3 ``conv2`` of a BasicBlock, the 1x1 ``conv3`` of a Bottleneck): their
  composition is one conv of the next conv's shape (up to the mix's bias at the zero-padded border), so
  the mix would add parameters and FLOPs but no expressiveness. The next conv absorbs it.

Dense timm ResNet weights load into a PCE-ResNet by upcycling (:func:`upcycle_dense_state_dict`, applied
by :func:`checkpoint_filter_fn`): every expert starts as a copy of the dense conv it replaces.

Pretrained tags whose weights are not the entrypoint's default architecture carry their own architecture
args (:data:`TAG_ARCH_ARGS`), applied whenever the tag is requested, so ``timm.create_model('arch.tag',
pretrained=True)`` builds the architecture the weights were trained with:

- ``pce_resnet18.fmnist``: Fashion-MNIST (10 classes, 1x28x28 grayscale, normalised with the dataset's mean
  0.2860 / std 0.3530), CIFAR stem (64 wide), stage widths (16, 32, 64, 128), PCE in stages 2 and 3 with
  2x2 px patches, 4 experts, top-1 cosine routing, no attention. Trained by ``make release``
  (scripts/make_release.py with scripts/configs/pce_resnet18_fmnist_release.yaml); weights on the Hub as
  ``pce-timm/pce_resnet18.fmnist``.

Other kwargs (``num_classes``, ``drop_path_rate``, ``features_only``, ...) pass through; an architecture kwarg
that contradicts the tag's raises a ValueError (the weights could not fit). Use the bare name
(``pce_resnet18``) to build other architectures; with ``pretrained=True`` the bare name loads the
architecture's best release (:data:`._pretrained.DEFAULT_PRETRAINED_TAGS`: ``pce_resnet18.fmnist``), and the
loaded weights are checked (:func:`._pretrained.check_loaded_weights`).
"""
import inspect
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerType
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from pce_timm.data.registry import FASHION_MNIST_CLASSES
from pce_timm.layers import PCEConv2d

from ._hub import hub_id
from ._pretrained import check_loaded_weights, default_pretrained_tag
from ._timm_compat import record_model_args

__all__ = ['PCEResNet', 'PCEBasicBlock', 'PCEBottleneck', 'upcycle_dense_state_dict', 'checkpoint_filter_fn']

STEM_TYPES = ('', 'deep', 'deep_tiered', 'cifar')
SOFT = 'soft'  # top_k value for soft routing over all experts (None does not survive timm.create_model)

# Arguments that define a PCE-ResNet's architecture beyond its depth; recorded as the model's model_args
# (saved with timm's save_for_hf / push_to_hf_hub) so a saved model rebuilds exactly.
PCE_ARCH_ARGS = (
    'stem_type', 'num_experts', 'top_k', 'router', 'pce_stages', 'patch_size', 'patch_grid', 'capacity_factor',
    'embed_chs', 'attention', 'gumbel_tau', 'mix_conv', 'pce_kwargs', 'expert_counts', 'choice', 'balance',
    'bias_update_rate', 'bias_update',
)
# The default routing grid: patches per side of each stage's output map, the patch size derived from the map at
# forward time. At 224 px it gives the old default's pixels, (8, 4, 7, 7), in stages 0-2 (56 / 28 / 14 px maps)
# and 4 px patches (a 2x2 grid) in stage 3's 7 px map, where 7 px patches routed every image as one patch; at 28 px
# with the CIFAR stem (28 / 14 / 7 / 4 px maps) stages 2-3 route 2x2 grids instead of one patch each.
DEFAULT_PATCH_GRID = (7, 7, 2, 2)
# The PCEConv2d arguments PCEResNet sets itself, which pce_kwargs must not repeat.
PCE_ARGS_SET_BY_MODEL = frozenset({
    'num_experts', 'top_k', 'router', 'embed_chs', 'capacity_factor', 'gumbel_tau', 'mix_conv', 'attention',
    'patch_size', 'patch_grid', 'in_chs', 'out_chs', 'kernel_size', 'stride', 'choice', 'balance',
    'bias_update_rate', 'bias_update',
})


def _check_block_args(
        cardinality: int,
        base_width: int,
        dilation: int,
        first_dilation: Optional[int],
        aa_layer: Optional[Type[nn.Module]],
        norm_layer: Type[nn.Module],
        act_layer: Type[nn.Module],
) -> None:
    """What a PCE block cannot take of timm's block arguments raises, naming what it accepts."""
    if cardinality != 1 or base_width != 64:
        raise ValueError(f'PCE blocks have dense (ungrouped) experts: cardinality must be 1 and base_width 64, '
                         f'got cardinality={cardinality}, base_width={base_width}')
    if dilation != 1 or (first_dilation or 1) != 1:
        raise ValueError(
            f'PCE blocks do not support dilation, got dilation={dilation}, first_dilation={first_dilation}')
    if aa_layer is not None:
        raise ValueError(f'PCE blocks do not support anti-aliasing (the experts hold the stride), got {aa_layer}')
    # The experts (pce_timm.layers.ConvExperts) are stacked Conv-BatchNorm2d-ReLU: their norm and activation
    # are the block's (bn1 / act1 of a BasicBlock), so a block of mixed norms or activations is not offered.
    if norm_layer is not nn.BatchNorm2d or act_layer is not nn.ReLU:
        raise ValueError(
            f"PCE blocks support only norm_layer=nn.BatchNorm2d ('batchnorm') and act_layer=nn.ReLU ('relu'): "
            f'the experts of their PCE layer are stacked Conv-BatchNorm2d-ReLU; got norm_layer={norm_layer!r}, '
            f'act_layer={act_layer!r}. Stages outside pce_stages take any norm_layer / act_layer.')


def _create_pce_conv(
        in_chs: int,
        out_chs: int,
        stride: int,
        patch_size: Optional[int],
        pce_args: Dict[str, Any],
        patch_grid: Optional[int] = None,
        device=None,
        dtype=None,
) -> PCEConv2d:
    """A 3x3 PCEConv2d whose patches cover ``patch_size`` output pixels, or (``patch_grid``, when
    ``patch_size`` is None) a ``patch_grid x patch_grid`` grid of the output map, built on ``device`` in ``dtype``."""
    patches = dict(patch_size=patch_size * stride) if patch_size is not None else dict(patch_grid=patch_grid)
    return PCEConv2d(in_chs, out_chs, kernel_size=3, stride=stride, device=device, dtype=dtype, **patches, **pce_args)


class PCEBasicBlock(nn.Module):
    """timm's BasicBlock whose first 3x3 conv (+ bn1 + act1) is a PCEConv2d.

    Takes timm's BasicBlock arguments (as passed by ``make_blocks``) plus ``patch_size`` (in pixels of the
    block's output map), or ``patch_grid`` (patches per side of it; with ``patch_size=None``), and ``pce_args``
    (the remaining PCEConv2d arguments). DropBlock, where enabled,
    acts on the PCE output (after the experts' ReLU, where timm's block applies it before the activation).
    ``norm_layer`` / ``act_layer`` build the dense ``bn2`` / ``act2`` and must be the experts' own,
    nn.BatchNorm2d / nn.ReLU (a ValueError says so otherwise); ``device`` / ``dtype`` reach every module.
    """
    expansion = 1
    pce_name = 'conv1'  # the PCE layer's attribute: the name of the dense conv it replaces
    dense_norm_name = 'bn1'  # the dense norm now inside the experts

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Callable[[], nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            patch_size: Optional[int] = 2,
            pce_args: Optional[Dict[str, Any]] = None,
            patch_grid: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_block_args(cardinality, base_width, dilation, first_dilation, aa_layer, norm_layer, act_layer)
        first_planes = planes // reduce_first
        outplanes = planes * self.expansion
        self.conv1 = _create_pce_conv(inplanes, first_planes, stride, patch_size, pce_args or {}, patch_grid, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.conv2 = nn.Conv2d(first_planes, outplanes, kernel_size=3, padding=1, bias=False, **dd)
        self.bn2 = norm_layer(outplanes, **dd)
        self.act2 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn2, 'weight', None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.drop_block(self.conv1(x))
        x = self.bn2(self.conv2(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class PCEBottleneck(nn.Module):
    """timm's Bottleneck whose 3x3 ``conv2`` (+ bn2 + act2) is a PCEConv2d. Arguments as :class:`PCEBasicBlock`."""
    expansion = 4
    pce_name = 'conv2'
    dense_norm_name = 'bn2'

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Callable[[], nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            patch_size: Optional[int] = 2,
            pce_args: Optional[Dict[str, Any]] = None,
            patch_grid: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_block_args(cardinality, base_width, dilation, first_dilation, aa_layer, norm_layer, act_layer)
        width = planes
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = _create_pce_conv(first_planes, width, stride, patch_size, pce_args or {}, patch_grid, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.drop_block(self.conv2(x))
        x = self.bn3(self.conv3(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


BLOCKS = {'basic': (BasicBlock, PCEBasicBlock), 'bottleneck': (Bottleneck, PCEBottleneck)}
PCE_BLOCKS = (PCEBasicBlock, PCEBottleneck)


def _stage_block(block: Type[nn.Module], **kwargs: Any) -> Callable[..., nn.Module]:
    """``block`` with stage-specific arguments bound; keeps ``expansion``, which timm's make_blocks reads."""
    fn = partial(block, **kwargs)
    fn.expansion = block.expansion
    return fn


def _per_stage(name: str, value: Union[int, Sequence[int]], num_stages: int) -> Tuple[int, ...]:
    values = (value,) * num_stages if isinstance(value, int) else tuple(value)
    if len(values) != num_stages or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f'{name} must be an int >= 1 or one per stage ({num_stages} ints), got {value!r}')
    return values


def _check_pce_stages(pce_stages: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    stages = tuple(pce_stages)
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_stages for i in stages):
        raise ValueError(f'pce_stages must hold stage indices in 0..{num_stages - 1}, got {pce_stages!r}')
    return tuple(sorted(set(stages)))


def _check_pce_kwargs(pce_kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    pce_kwargs = dict(pce_kwargs or {})
    repeated = sorted(PCE_ARGS_SET_BY_MODEL & set(pce_kwargs))
    if repeated:
        raise ValueError(f'pce_kwargs must not repeat arguments PCEResNet sets, got {repeated}')
    return pce_kwargs


# output_stride -> the stages timm's ResNet dilates (stride 1) instead of striding
DILATED_STAGES = {32: (), 16: (3,), 8: (2, 3)}


def _check_output_stride(output_stride: int, pce_stages: Tuple[int, ...]) -> None:
    if output_stride not in DILATED_STAGES:
        raise ValueError(f'output_stride must be one of {tuple(DILATED_STAGES)}, got {output_stride!r}')
    dilated = DILATED_STAGES[output_stride]
    clash = sorted(set(dilated) & set(pce_stages))
    if clash:
        fits = ', '.join(f'{stride}: pce_stages within {tuple(i for i in range(4) if i not in stages)}'
                         for stride, stages in DILATED_STAGES.items())
        raise ValueError(
            f'output_stride={output_stride} dilates stage(s) {dilated}, but stage(s) {clash} are PCE stages '
            f'(pce_stages={pce_stages}) and PCE layers have no dilated experts. Output strides and the PCE stages '
            f'they allow: {fits}. Use output_stride=32 (e.g. Unet / FPN), or move PCE to earlier stages.')


def _layer_top_k(top_k: Union[int, str, None]) -> Optional[int]:
    """The model's ``top_k`` as PCEConv2d takes it: 'soft' / None -> None (soft routing), else the int."""
    if top_k is None or top_k == SOFT:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int >= 1 or {SOFT!r} (soft routing over all experts), got {top_k!r}")
    return top_k


class PCEResNet(ResNet):
    """ResNet whose blocks in ``pce_stages`` are PCE blocks (see the module docstring).

    Parameter groups (``group_matcher``) are timm's ResNet ones: a block's router and patch embedding belong
    to the block's group, so layer-wise schedules and freezing treat a block as a unit. ``no_weight_decay``
    lists the cosine routers' keys (see there).
    """

    def __init__(
            self,
            layers: Sequence[int] = (2, 2, 2, 2),
            block: str = 'basic',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            stem_width: int = 64,
            stem_type: str = '',
            channels: Sequence[int] = (64, 128, 256, 512),
            avg_down: bool = False,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            drop_block_rate: float = 0.0,
            zero_init_last: bool = True,
            num_experts: int = 4,
            top_k: Union[int, str, None] = 1,
            router: str = 'cosine',
            pce_stages: Sequence[int] = (2, 3),
            patch_size: Union[int, Sequence[int], None] = None,
            capacity_factor: float = 1.0,
            embed_chs: int = 8,
            attention: bool = False,
            gumbel_tau: float = 0.0,
            mix_conv: Optional[bool] = False,
            pce_kwargs: Optional[Dict[str, Any]] = None,
            expert_counts: Optional[Dict[str, int]] = None,
            choice: str = 'token',
            balance: str = 'loss',
            bias_update_rate: float = 1e-3,
            bias_update: str = 'sign',
            output_stride: int = 32,
            patch_grid: Union[int, Sequence[int], None] = DEFAULT_PATCH_GRID,
            device=None,
            dtype=None,
    ):
        """
        Args:
            layers: blocks per stage (4 stages).
            block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50 and deeper).
            num_classes, in_chans, global_pool, stem_width, channels, avg_down, drop_rate, drop_path_rate,
                drop_block_rate, zero_init_last, device, dtype: as timm's ResNet.
            stem_type: timm's '' (7x7 conv + max-pool), 'deep', 'deep_tiered', or 'cifar': a 3x3 stride-1
                conv and no max-pool, for 28-32 px inputs (the network's stride drops from 32 to 8).
            act_layer, norm_layer: as timm's ResNet (a class or timm's name, e.g. 'silu', 'groupnorm') for the
                stem, the dense stages and the downsampling; a PCE stage takes only its experts' own, nn.ReLU
                and nn.BatchNorm2d (the defaults), and raises a ValueError for any other.
            num_experts: experts per PCE layer.
            top_k: experts per patch; 'soft' (or None) routes softly over all experts. Pass 'soft' through
                ``timm.create_model``, which drops None-valued kwargs.
            router: the PCE layers' router ('cosine', 'mlp', 'positional', 'uniform').
            pce_stages: indices (0-3) of the stages built from PCE blocks.
            patch_size: routing patch size in pixels of each stage's output map; an int or one per stage. When
                given it wins over ``patch_grid`` (models saved before ``patch_grid`` existed all record it).
            capacity_factor: slots per expert in the sparse path while training, relative to a perfectly balanced
                load (eval routes every patch to exactly its chosen experts).
            embed_chs: channels of the patch embedding the router reads.
            attention: deformable attention in the PCE layers of the last PCE stage.
            gumbel_tau: > 0 samples routing from a Gumbel-softmax while training.
            mix_conv: the PCE layers' 1x1 mix after the experts (None: on when num_experts > 1).
            pce_kwargs: further PCEConv2d arguments (e.g. router_temperature, spp_levels).
            expert_counts: PCE layer name (e.g. ``'layer3.0.conv1'``) -> its number of experts, for the layers
                that differ from ``num_experts``. Expert surgery (:mod:`pce_timm.analysis.surgery`) records its
                result here, so a saved pruned or reinforced model rebuilds with the right shapes.
            choice: the PCE layers' routing discipline: 'token' (each patch picks its top_k experts) or 'expert'
                (each expert picks its top patches of every image; balanced by construction).
            balance: 'loss' (the load-balance aux loss) or 'bias' (loss-free balancing bias, token choice only).
            bias_update_rate: the largest step of the balance bias per optimizer update (``balance='bias'``).
            bias_update: how that bias moves: 'sign' (the full rate every update, DeepSeek-V3's; default) or
                'proportional' (to the expert's relative over- / under-load); see :class:`PCEConv2d`.
            output_stride: 32, 16 or 8, as timm's ResNet: 16 dilates stage 3 instead of striding it, 8 stages 2
                and 3 (DeepLabV3+ asks for 16). PCE layers have no dilated experts, so a dilated stage must be
                dense: a ValueError names the stages ``output_stride`` dilates and the ``pce_stages`` that fit.
            patch_grid: without ``patch_size``: the routing grid, patches per side of each stage's output map (an
                int or one per stage); each PCE layer derives its patch size from its map at forward time, so it
                routes that grid at any input size (at most that grid: a smaller map gets 1 px patches). Default
                :data:`DEFAULT_PATCH_GRID`, ``(7, 7, 2, 2)``.
        """
        if len(layers) != 4 or len(channels) != 4:
            raise ValueError(f'layers and channels must have 4 stages, got layers={layers!r}, channels={channels!r}')
        if block not in BLOCKS:
            raise ValueError(f'block must be one of {tuple(BLOCKS)}, got {block!r}')
        if stem_type not in STEM_TYPES:
            raise ValueError(f'stem_type must be one of {STEM_TYPES}, got {stem_type!r}')
        pce_stages = _check_pce_stages(pce_stages, len(layers))
        _check_output_stride(output_stride, pce_stages)
        if patch_size is not None:  # pixels win: the only form of every model saved before patch_grid
            patch_sizes, patch_grids = _per_stage('patch_size', patch_size, len(layers)), (None,) * len(layers)
        else:
            if patch_grid is None:
                raise ValueError('give patch_size (px of each stage\'s output map) or patch_grid (patches per side '
                                 f'of it), e.g. the default patch_grid={DEFAULT_PATCH_GRID}; both are None')
            patch_sizes, patch_grids = (None,) * len(layers), _per_stage('patch_grid', patch_grid, len(layers))
        pce_kwargs = _check_pce_kwargs(pce_kwargs)

        if mix_conv is None:  # decided once for the model, so a layer given another expert count keeps it
            mix_conv = num_experts > 1
        pce_args = dict(num_experts=num_experts, top_k=_layer_top_k(top_k), router=router, embed_chs=embed_chs,
                        capacity_factor=capacity_factor, gumbel_tau=gumbel_tau, mix_conv=mix_conv, choice=choice,
                        balance=balance, bias_update_rate=bias_update_rate, bias_update=bias_update, **pce_kwargs)
        stage_args = {i: dict(pce_args, attention=attention and i == pce_stages[-1]) for i in pce_stages}
        dense_block, pce_block = BLOCKS[block]
        block_fns = tuple(
            _stage_block(pce_block, patch_size=patch_sizes[i], patch_grid=patch_grids[i], pce_args=stage_args[i])
            if i in pce_stages else dense_block
            for i in range(len(layers)))
        super().__init__(
            block=block_fns, layers=tuple(layers), num_classes=num_classes, in_chans=in_chans,
            global_pool=global_pool, stem_width=stem_width, stem_type='' if stem_type == 'cifar' else stem_type,
            channels=tuple(channels), avg_down=avg_down, act_layer=act_layer, norm_layer=norm_layer,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, drop_block_rate=drop_block_rate,
            zero_init_last=zero_init_last, output_stride=output_stride, device=device, dtype=dtype)
        self.pce_stages = pce_stages
        if stem_type == 'cifar':
            self._use_cifar_stem(in_chans, device=device, dtype=dtype)
        if expert_counts:
            self._set_expert_counts(expert_counts, patch_sizes, stage_args, patch_grids, device=device, dtype=dtype)
        for name, module in self.named_modules():
            if isinstance(module, PCEConv2d):
                module.layer_name = name  # for the layer's messages

    def _set_expert_counts(
            self,
            expert_counts: Mapping[str, int],
            patch_sizes: Tuple[Optional[int], ...],
            stage_args: Dict[int, Dict[str, Any]],
            patch_grids: Tuple[Optional[int], ...],
            device=None,
            dtype=None,
    ) -> None:
        """Rebuild the named PCE layers with their own number of experts (freshly initialised)."""
        if not isinstance(expert_counts, Mapping):
            raise TypeError(f'expert_counts must map PCE layer names to ints, got {type(expert_counts).__name__}')
        blocks = {f'{name}.{block.pce_name}': (name, block)
                  for name, block in self.named_modules() if isinstance(block, PCE_BLOCKS)}
        unknown = sorted(set(expert_counts) - set(blocks))
        if unknown:
            raise ValueError(f'expert_counts names unknown PCE layers {unknown}; accepted: {sorted(blocks)}')
        least = stage_args[self.pce_stages[0]]['top_k'] or 1  # sparse routing needs top_k experts
        for layer_name, count in expert_counts.items():
            block_name, block = blocks[layer_name]
            if isinstance(count, bool) or not isinstance(count, int) or count < least:
                raise ValueError(f'expert_counts[{layer_name!r}] must be an int >= {least} (>= 1 and >= top_k), '
                                 f'got {count!r}')
            stage = int(block_name.split('.')[0][len('layer'):]) - 1  # timm's ResNet stages are layer1..layer4
            old: PCEConv2d = getattr(block, block.pce_name)
            layer = _create_pce_conv(old.in_chs, old.out_chs, old.stride, patch_sizes[stage],
                                     dict(stage_args[stage], num_experts=count), patch_grids[stage], device=device,
                                     dtype=dtype)
            _init_experts(layer)
            setattr(block, block.pce_name, layer)

    def _use_cifar_stem(self, in_chans: int, device=None, dtype=None) -> None:
        """Replace timm's 7x7 stride-2 stem and its max-pool by a 3x3 stride-1 conv (reductions / 4)."""
        self.conv1 = nn.Conv2d(in_chans, self.bn1.num_features, 3, padding=1, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        self.feature_info = [dict(info, reduction=max(1, info['reduction'] // 4)) for info in self.feature_info]

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """timm's ResNet init for the dense convs; each expert is initialised like the dense conv it replaces.

        The PCE layers' other modules (patch embedding, router, mix conv, attention) keep the layer's own
        initialisation; e.g. the attention residual must start at zero.
        """
        pce_owned = set()
        for module in self.modules():
            if isinstance(module, PCEConv2d):
                pce_owned.update(id(m) for m in module.modules())
                _init_experts(module)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and id(module) not in pce_owned:
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for module in self.modules():
                if hasattr(module, 'zero_init_last'):
                    module.zero_init_last()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The cosine routers' keys.

        Only a key's direction matters (the router normalises it), so weight decay cannot regularise it; it
        would only shrink its norm, which raises its effective learning rate step after step.
        """
        return {name for name, _ in self.named_parameters() if name.endswith('.router.keys')}


def _init_experts(layer: PCEConv2d) -> None:
    """Each expert initialised like the dense conv it replaces (timm's ResNet init)."""
    for expert_weight in layer.experts.weight:
        nn.init.kaiming_normal_(expert_weight, mode='fan_out', nonlinearity='relu')


def pce_arch_args(**kwargs: Any) -> Dict[str, Any]:
    """The :data:`PCE_ARCH_ARGS` of a PCE-ResNet built with ``kwargs`` (PCEResNet's defaults for the others).

    Soft routing is recorded as ``top_k='soft'``: timm drops None-valued kwargs when it rebuilds a saved model.
    """
    params = inspect.signature(PCEResNet.__init__).parameters
    args = {name: kwargs.get(name, params[name].default) for name in PCE_ARCH_ARGS}
    if args['top_k'] is None:
        args['top_k'] = SOFT
    if args['patch_size'] is not None:
        args['patch_grid'] = None  # pixels win (see PCEResNet); None is dropped when timm rebuilds the model
    return args


def upcycle_dense_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        noise_std: float = 0.0,
        seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Convert a dense timm ResNet state dict for ``model``, a PCE-ResNet of the same widths ("upcycling").

    For every PCE block, the dense 3x3 conv weight [o, i, 3, 3] is copied into each of the E experts
    ([E, o, i, 3, 3]) and the dense BatchNorm that followed it is tiled E times into the experts' BatchNorm.
    Parameters the dense network has no counterpart for (patch embedding, router, mix conv, attention) are
    taken from ``model`` as it is. Every other entry passes through unchanged.

    With identical experts and no mix conv the PCE-ResNet computes exactly what the dense one does, whatever
    the routing. ``noise_std > 0`` breaks the symmetry: experts 1..E-1 get Gaussian noise of ``noise_std``
    times the dense weight's standard deviation (expert 0 stays exact), drawn from a generator seeded with
    ``seed``, so the result is deterministic.
    """
    if noise_std < 0:
        raise ValueError(f'noise_std must be >= 0, got {noise_std}')
    generator = torch.Generator().manual_seed(seed)
    model_state = model.state_dict()
    out, consumed = {}, set()
    for block_name, block in model.named_modules():
        if not isinstance(block, PCE_BLOCKS):
            continue
        layer: PCEConv2d = getattr(block, block.pce_name)
        prefix = f'{block_name}.{block.pce_name}'
        dense_weight_key = f'{prefix}.weight'
        if dense_weight_key not in state_dict:
            raise KeyError(f'upcycling: the dense state dict has no {dense_weight_key!r} for the PCE layer {prefix!r}')
        dense_weight = state_dict[dense_weight_key]
        expected = tuple(layer.experts.weight.shape[1:])
        if tuple(dense_weight.shape) != expected:
            raise ValueError(f'upcycling: {dense_weight_key} has shape {tuple(dense_weight.shape)}, '
                             f'the experts of {prefix!r} need {expected}')
        num_experts = layer.num_experts
        experts = dense_weight.unsqueeze(0).repeat(num_experts, 1, 1, 1, 1)
        if noise_std > 0 and num_experts > 1:
            noise = torch.randn(experts[1:].shape, generator=generator, dtype=torch.float32)
            experts[1:] += (noise * noise_std * dense_weight.float().std()).to(experts.dtype)
        out[f'{prefix}.experts.weight'] = experts
        consumed.add(dense_weight_key)
        norm_prefix = f'{block_name}.{block.dense_norm_name}.'
        for key, value in state_dict.items():
            if key.startswith(norm_prefix):
                name = key[len(norm_prefix):]
                out[f'{prefix}.experts.bn.{name}'] = value if value.dim() == 0 else value.repeat(num_experts)
                consumed.add(key)
        for key, value in model_state.items():
            if key.startswith(prefix + '.') and key not in out:
                out[key] = value  # PCE-only parameters: the model's own initialisation
    out.update({key: value for key, value in state_dict.items() if key not in consumed})
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Load a PCE-ResNet checkpoint as is, or upcycle a dense timm ResNet one (e.g. ``resnet18``)."""
    state_dict = state_dict.get('state_dict', state_dict)
    state_dict = state_dict.get('model', state_dict)
    is_dense = any(
        f'{name}.{block.pce_name}.weight' in state_dict
        for name, block in model.named_modules() if isinstance(block, PCE_BLOCKS))
    return upcycle_dense_state_dict(state_dict, model) if is_dense else state_dict


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        **kwargs,
    }


# The first tag of an architecture is its default: 'untrained' (ImageNet-shaped cfg, no weights). Tags with
# weights get hf_hub_id=hub_id('<arch>.<tag>') (see ._hub) and, if needed, an entry in TAG_ARCH_ARGS; a '*'
# keeps 'untrained' the default, so the bare name stays the ImageNet-shaped architecture.
default_cfgs = generate_default_cfgs({
    # Fashion-MNIST as pce_timm.data feeds it: 1 grayscale channel, 28 px, the dataset's mean / std, no crop.
    'pce_resnet18.fmnist': _cfg(
        hf_hub_id=hub_id('pce_resnet18.fmnist'), num_classes=10, input_size=(1, 28, 28), pool_size=(4, 4),
        crop_pct=1.0, interpolation='bicubic', mean=(0.2860,), std=(0.3530,), label_names=FASHION_MNIST_CLASSES,
        description='Fashion-MNIST classifier (pce_timm dataset fashion_mnist), trained by make release'),
    'pce_resnet18.untrained*': _cfg(),  # '*' (and after .fmnist): stays the default tag
    'pce_resnet34.untrained': _cfg(),
    'pce_resnet50.untrained': _cfg(),
    'pce_resnet18_e8.untrained': _cfg(),
    'pce_resnet34_e8.untrained': _cfg(),
    'pce_resnet50_e8.untrained': _cfg(),
})


# Architecture args of pretrained tags, applied when the tag is requested: timm passes the tag to the entrypoint
# as ``pretrained_cfg='<tag>'`` (and sets num_classes / in_chans from the tag's cfg). A kwarg the caller also
# passes must agree (see _tag_arch_args). hf-hub: / local-dir: sources bring their own model_args instead.
TAG_ARCH_ARGS: Dict[str, Dict[str, Any]] = {
    'pce_resnet18.fmnist': dict(
        stem_type='cifar', channels=(16, 32, 64, 128), pce_stages=(2, 3), patch_size=2,
        num_experts=4, top_k=1, router='cosine', attention=False),
}


def _comparable_arch_value(key: str, value: Any, num_stages: int = 4) -> Any:
    if key in ('patch_size', 'patch_grid') and isinstance(value, int) and not isinstance(value, bool):
        return (value,) * num_stages
    if key == 'pce_stages' and isinstance(value, (list, tuple)):
        return tuple(sorted(set(value)))
    if isinstance(value, list):
        return tuple(value)
    return value


def _tag_arch_args(variant: str, kwargs: Dict[str, Any],
                   tag_arch_args: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The arch args of the requested tag (``kwargs['pretrained_cfg']`` when it is a tag name) in ``tag_arch_args``
    (default :data:`TAG_ARCH_ARGS`; the hybrids pass their own table).

    Raises:
        ValueError: a kwarg contradicts the tag's architecture (its weights would not fit).
    """
    tag = kwargs.get('pretrained_cfg')
    if not isinstance(tag, str):
        return {}  # None: the default tag; a cfg dict (hf-hub:, local-dir:) comes with its own model_args
    name = f'{variant}.{tag}'
    tag_args = (TAG_ARCH_ARGS if tag_arch_args is None else tag_arch_args).get(name, {})
    conflicts = [
        f'{key}={kwargs[key]!r} (the tag has {value!r})' for key, value in tag_args.items()
        if key in kwargs and _comparable_arch_value(key, kwargs[key]) != _comparable_arch_value(key, value)]
    if conflicts:
        raise ValueError(
            f'{name} is a fixed architecture (its pretrained weights fit only it), but got {", ".join(conflicts)}. '
            f'Drop these kwargs, or build {variant!r} without the tag to choose the architecture yourself.')
    return dict(tag_args)


def _create_pce_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    tag = default_pretrained_tag(variant, pretrained, kwargs)  # the bare name + pretrained: the best release
    if tag is not None:
        kwargs = dict(kwargs, pretrained_cfg=tag)
    tag_args = _tag_arch_args(variant, kwargs)
    kwargs = dict(kwargs, **tag_args)
    try:
        model = build_model_with_cfg(
            PCEResNet, variant, pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls='getter'),  # forward_intermediates: features come from the model's code
            **kwargs,
        )
    except Exception as e:
        if pretrained:
            _explain_weights_error(variant, kwargs, e)
        raise
    record_model_args(model, **pce_arch_args(**kwargs), **{k: v for k, v in tag_args.items() if k not in PCE_ARCH_ARGS})
    if pretrained and isinstance(kwargs.get('pretrained_cfg'), str):  # a registry tag (hf-hub: / local-dir: bring
        check_loaded_weights(model, f'{variant}.{kwargs["pretrained_cfg"]}', kwargs.get('cache_dir'),  # their own)
                             normalize=_comparable_arch_value)
    return model


def _explain_weights_error(variant: str, kwargs: Dict[str, Any], error: Exception) -> None:
    """Re-raise a failed pretrained load with a message that says what is wrong and how to fix it.

    Weights neither cached nor downloadable: :class:`~pce_timm.hub.MissingWeightsError` (which repo, where it
    looked, how to get them: ``make release``). A cached file, or a ``local-dir:`` folder's, that is truncated,
    corrupt or does not fit the architecture: :class:`~pce_timm.hub.ReleaseError` naming the file. Anything else
    propagates unchanged.
    """
    from pce_timm.hub.offline import _MISSING_ERRORS, MissingWeightsError, explain_missing_weights

    tag = kwargs.get('pretrained_cfg')
    if isinstance(tag, dict) and tag.get('source') == 'local-dir' and tag.get('file'):
        from pce_timm.hub import check_model_folder

        check_model_folder(tag['file'])  # a ReleaseError naming the file: truncated, corrupt, keys or shapes
        return
    name = f'{variant}.{tag}' if isinstance(tag, str) else variant
    if isinstance(error, _MISSING_ERRORS):
        missing = MissingWeightsError(explain_missing_weights(name, kwargs.get('cache_dir'), cause=error))
        missing.cause = error  # the message names it; no chained traceback for what is a missing download
        raise missing from None
    path = _cached_weights_file(name, kwargs.get('cache_dir'))
    if path is None:
        return
    from pce_timm.hub import ReleaseError, check_safetensors

    check_safetensors(path)  # raises a ReleaseError naming the file if it is truncated or corrupt
    raise ReleaseError(
        f'{path}: the cached weights of {name!r} do not load into {variant!r} built for the tag '
        f'({type(error).__name__}: {str(error).strip().splitlines()[0][:300]}). Delete the file and '
        f'download it again, or rebuild the release with `make release --overwrite`.') from error


def _cached_weights_file(name: str, cache_dir: Any) -> Optional[str]:
    """The HF-cache path of ``name``'s Hub weights file, if it is cached."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    path = try_to_load_from_cache(cfg.hf_hub_id, cfg.hf_hub_filename or 'model.safetensors', cache_dir=cache_dir)
    return path if isinstance(path, str) else None


@register_model
def pce_resnet18(pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    """PCE-ResNet-18: BasicBlocks (2, 2, 2, 2), 4 experts top-1 in the last two stages."""
    model_args = dict(layers=(2, 2, 2, 2), block='basic', num_experts=4)
    return _create_pce_resnet('pce_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def pce_resnet34(pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    """PCE-ResNet-34: BasicBlocks (3, 4, 6, 3), 4 experts top-1 in the last two stages."""
    model_args = dict(layers=(3, 4, 6, 3), block='basic', num_experts=4)
    return _create_pce_resnet('pce_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def pce_resnet50(pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    """PCE-ResNet-50: Bottlenecks (3, 4, 6, 3), 4 experts top-1 in the last two stages."""
    model_args = dict(layers=(3, 4, 6, 3), block='bottleneck', num_experts=4)
    return _create_pce_resnet('pce_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def pce_resnet18_e8(pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    """PCE-ResNet-18 with 8 experts per PCE layer."""
    model_args = dict(layers=(2, 2, 2, 2), block='basic', num_experts=8)
    return _create_pce_resnet('pce_resnet18_e8', pretrained, **dict(model_args, **kwargs))


@register_model
def pce_resnet34_e8(pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    """PCE-ResNet-34 with 8 experts per PCE layer."""
    model_args = dict(layers=(3, 4, 6, 3), block='basic', num_experts=8)
    return _create_pce_resnet('pce_resnet34_e8', pretrained, **dict(model_args, **kwargs))


@register_model
def pce_resnet50_e8(pretrained: bool = False, **kwargs: Any) -> PCEResNet:
    """PCE-ResNet-50 with 8 experts per PCE layer."""
    model_args = dict(layers=(3, 4, 6, 3), block='bottleneck', num_experts=8)
    return _create_pce_resnet('pce_resnet50_e8', pretrained, **dict(model_args, **kwargs))
