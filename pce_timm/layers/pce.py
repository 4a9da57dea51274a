"""PCEConv2d: Positional Convolution Experts as a drop-in replacement for a Conv-BN-ReLU.

The map is cut into patches; each patch is embedded (features + coordinates, spatial pyramid pooling),
routed by content and position to E experts (Conv-BN-ReLU), and the experts' outputs are summed with the
router's weights, mixed by a 1x1 conv and optionally passed through deformable attention.

``forward`` composes the parts and reads as embed -> route -> dispatch -> mix -> attention:

- :mod:`.embed` (:class:`PatchEmbedSPP`) and :mod:`.routers`: patch embeddings -> router logits (fp32);
  :func:`.dispatch.route` turns them into a :class:`.dispatch.Routing` (choices and weights);
- :mod:`.dispatch`: one parameter-free module per discipline, each with a cached plan of static index maps:
  :class:`.dispatch.SoftDispatch` (``top_k=None``: every expert on every pixel),
  :class:`.dispatch.SlotDispatch` (training: Switch-style slots of a static capacity with rerouting; also
  the static eval of compiled / exported graphs, meta tensors and ``eval_capacity_factor``) and
  :class:`.dispatch.SortedDispatch` (eager / TorchScript eval: every patch to exactly its chosen experts);
  the layer only chooses one and, for slots, the capacity. With ``choice='expert'`` the experts choose instead:
  :func:`.dispatch.expert_choice` (each expert its top-c patches of every image) and
  :class:`.dispatch.ExpertChoiceDispatch`, in training and eval alike;
- :mod:`.mix` (1x1 conv on the sparse path's pixel rows) and :mod:`.attention` (skipped while switched off).

Device-specific speed tricks live in :mod:`.kernels_cpu`; every op has a plain PyTorch reference path that
runs everywhere else. ``forward`` returns a Tensor. What routing did is kept on the module
(``last_router_logits``, ``last_expert_indices``, ...) for aux losses (:mod:`.losses`) and statistics
(:meth:`PCEConv2d.routing_stats`).

Balance: ``balance='loss'`` leaves it to the Switch load-balance loss (:mod:`.losses`); ``balance='bias'`` is
loss-free balancing (Wang et al. 2024): a per-expert buffer ``balance_bias`` added to the scores that choose
the experts, never to the mixing weights, moved outside the graph after every optimizer step by
:func:`pce_timm.train.balance.update_balance_bias` (``bias_update``: DeepSeek's 'sign' or 'proportional').
Expert choice is balanced by construction.

Shape legend: b batch, c/o in/out channels, h/w input map, ho/wo output map, n patches, e experts,
k top-k, d embedding dim, t = b * n tokens, s slots per expert (capacity).
"""
import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import register_notrace_module

from .attention import DeformableAttention2d
from .dispatch import (
    ExpertChoiceDispatch,
    Routing,
    SlotDispatch,
    SoftDispatch,
    SortedDispatch,
    expert_capacity,
    expert_choice,
    expert_choice_capacity,
    route,
)
from .dispatch.plans import is_exporting, is_tracing
from .embed import PatchEmbedSPP
from .experts import ConvExperts
from .mix import mix_pixels
from .patches import grid_patch_size, grid_size, patch_positions
from .routers import (
    ROUTERS,
    create_router,
    fill_missing_buffer,
    positional_logits,
    router_needs_embeddings,
    uniform_logits,
)
from .routing_stats import (
    dead_experts,
    dropped_fraction,
    expert_load,
    imbalance,
    mean_router_entropy,
    usage_counts,
    usage_entropy,
)

ROUTING_MODES = ('router', 'positional', 'uniform')
CHOICES = ('token', 'expert')  # token: each patch picks its top-k experts; expert: each expert its top-c patches
BALANCES = ('loss', 'bias')  # loss: Switch load-balance loss; bias: loss-free balancing bias
# how the balancing bias moves after a step (rate = bias_update_rate, loads of the step): 'proportional' by
# rate * clamp((mean - load) / mean, -1, 1), 'sign' (Wang et al. 2024, DeepSeek-V3) by rate * sign(mean - load)
BIAS_UPDATES = ('sign', 'proportional')
DEFAULT_PATCH_SIZE = 8  # pixels, when neither patch_size nor patch_grid is given
# A patch may exceed its map (one padded patch: a 1x1 grid, which warns), up to this many times the map's area
# after padding; beyond, the padding costs memory for nothing (``patch_size=1000`` on a 7x7 map asked for 32 GB),
# so the layer refuses it. 64 keeps every patch the zoo's old default (8, 4, 7, 7) px gives down to 1x1 maps
# (at most 49x), so models saved with it load and run as before.
MAX_PADDED_AREA = 64


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be an int >= 1, got {value!r}')


def _check_patches(
        patch_size: Union[int, Tuple[int, int], None], patch_grid: Union[int, Tuple[int, int], None],
        stride: int) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
    """The layer's ``(patch_size, patch_grid)`` as (h, w) tuples, exactly one of them None; ValueError if bad."""
    if patch_size is not None and patch_grid is not None:
        raise ValueError(f'give patch_size (pixels of a patch) or patch_grid (patches per side of the map), not '
                         f'both; got patch_size={patch_size!r}, patch_grid={patch_grid!r}')
    if patch_grid is not None:
        grid = tuple(to_2tuple(patch_grid))
        if len(grid) != 2:
            raise ValueError(f'patch_grid must be an int or (rows, cols), got {patch_grid!r}')
        for size in grid:
            _check_positive_int('patch_grid', size)
        return None, (int(grid[0]), int(grid[1]))
    size = tuple(to_2tuple(DEFAULT_PATCH_SIZE if patch_size is None else patch_size))
    if len(size) != 2:
        raise ValueError(f'patch_size must be an int or (h, w), got {patch_size!r}')
    for value in size:
        _check_positive_int('patch_size', value)
        if value % stride != 0:
            raise ValueError(f'patch_size {size} must be a multiple of stride={stride}')
    return (int(size[0]), int(size[1])), None


def _check_arguments(
        in_chs: int, out_chs: int, kernel_size: int, stride: int, num_experts: int, top_k: Optional[int], router: str,
        embed_chs: int, capacity_factor: float, eval_capacity_factor: Optional[float], gumbel_tau: float,
        choice: str = 'token', balance: str = 'loss', bias_update_rate: float = 0.0,
        bias_update: str = 'sign') -> None:
    """Raise ValueError naming the first bad argument of :class:`PCEConv2d` (the patches: :func:`_check_patches`)."""
    for name, value in (('in_chs', in_chs), ('out_chs', out_chs), ('kernel_size', kernel_size),
                        ('stride', stride), ('num_experts', num_experts), ('embed_chs', embed_chs)):
        _check_positive_int(name, value)
    if kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd (same padding), got {kernel_size}')
    if top_k is not None:
        _check_positive_int('top_k', top_k)
        if top_k > num_experts:
            raise ValueError(f'top_k must be None or in 1..num_experts={num_experts}, got {top_k}')
    if router not in ROUTERS:
        raise ValueError(f'router must be one of {ROUTERS}, got {router!r}')
    if capacity_factor <= 0:
        raise ValueError(f'capacity_factor must be > 0, got {capacity_factor}')
    if eval_capacity_factor is not None and eval_capacity_factor <= 0:
        raise ValueError(f'eval_capacity_factor must be None (exact routing) or > 0, got {eval_capacity_factor}')
    if gumbel_tau < 0:
        raise ValueError(f'gumbel_tau must be >= 0 (0 = off), got {gumbel_tau}')
    check_choice_balance(choice, balance, top_k is None, bias_update_rate, bias_update)
    if choice == 'expert' and eval_capacity_factor is not None:
        raise ValueError("eval_capacity_factor does not apply to choice='expert' (eval picks as training does, "
                         'with capacity_factor); leave it None')


def check_choice_balance(choice: str, balance: str, soft: bool, bias_update_rate: float = 0.0,
                         bias_update: str = 'sign') -> None:
    """Raise ValueError when a routing discipline (``choice``) and ``balance`` do not fit each other or soft routing."""
    if choice not in CHOICES:
        raise ValueError(f'choice must be one of {CHOICES}, got {choice!r}')
    if balance not in BALANCES:
        raise ValueError(f'balance must be one of {BALANCES}, got {balance!r}')
    if soft and choice == 'expert':
        raise ValueError("choice='expert' needs sparse routing: set top_k to an int (k experts per patch on "
                         "average; top_k=None is soft routing, where every expert sees every patch)")
    if soft and balance == 'bias':
        raise ValueError("balance='bias' biases which experts are chosen, and soft routing (top_k=None) chooses "
                         "them all: set top_k to an int or use balance='loss'")
    if choice == 'expert' and balance == 'bias':
        raise ValueError("choice='expert' is balanced by construction (every expert takes the same number of "
                         "patches); use balance='loss' (no load-balance loss is applied to it) with it")
    if isinstance(bias_update_rate, bool) or not isinstance(bias_update_rate, (int, float)) or bias_update_rate < 0:
        raise ValueError(f'bias_update_rate must be a number >= 0, got {bias_update_rate!r}')
    if bias_update not in BIAS_UPDATES:
        raise ValueError(f'bias_update must be one of {BIAS_UPDATES}, got {bias_update!r}')


@register_notrace_module  # routing is data-dependent: torch.fx keeps the layer as one leaf call
class PCEConv2d(nn.Module):
    __jit_unused_properties__ = ['attn_gate']

    last_router_logits: Optional[torch.Tensor]
    last_routing_weights: Optional[torch.Tensor]
    last_expert_indices: Optional[torch.Tensor]
    last_embeddings: Optional[torch.Tensor]
    last_expert_mask: Optional[torch.Tensor]
    eval_capacity_factor: Optional[float]
    patch_grid: Optional[Tuple[int, int]]
    layer_name: str

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            num_experts: int = 4,
            patch_size: Union[int, Tuple[int, int], None] = None,
            top_k: Optional[int] = None,
            router: str = 'cosine',
            embed_chs: int = 8,
            spp_levels: Sequence[int] = (1, 2, 4),
            router_temperature: float = 0.1,
            router_noise_std: float = 1.0,
            router_hidden_dim: int = 64,
            gumbel_tau: float = 0.0,
            capacity_factor: float = 1.0,
            eval_capacity_factor: Optional[float] = None,
            mix_conv: Optional[bool] = None,
            attention: bool = False,
            attn_heads: int = 4,
            track_routing: bool = True,
            choice: str = 'token',
            balance: str = 'loss',
            bias_update_rate: float = 1e-3,
            bias_update: str = 'sign',
            patch_grid: Union[int, Tuple[int, int], None] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            in_chs, out_chs, kernel_size, stride: as for ``nn.Conv2d`` (padding is ``kernel_size // 2``).
            num_experts: E, the number of Conv-BN-ReLU experts.
            patch_size: routing unit (int or (h, w)) in pixels of the input map; a multiple of ``stride``. Default
                (neither it nor ``patch_grid`` given): 8. A patch may be larger than the map (one padded patch)
                up to a padded area of :data:`MAX_PADDED_AREA` times the map's; beyond, forward raises a ValueError.
            top_k: None routes softly over all experts; k sends each patch only to its k best experts.
            router: one of ``ROUTERS``: 'cosine' (keys), 'mlp', 'positional' (+ noise), 'uniform'.
            embed_chs: C' of the patch embedding; D = C' x sum(level^2 for level in spp_levels).
            router_temperature: divides cosine similarities ('cosine' router).
            router_noise_std: noise on positional logits while training ('positional' router or mode).
            router_hidden_dim: hidden width of the 'mlp' router.
            gumbel_tau: > 0 samples routing from a Gumbel-softmax with this temperature while training.
            capacity_factor: sparse path while training: slots per expert = ceil(factor * t * k / E); with
                >= 1 no patch is dropped (overflow is rerouted to free slots); the conv cost scales with the
                factor.
            eval_capacity_factor: sparse path in eval. None (default): every patch gets exactly its chosen
                experts, whatever the rest of the batch routes (see :class:`.dispatch.SortedDispatch`; a compiled or
                exported graph then holds a slot per token at every expert). A number: slots per expert as in
                training, so a compiled or exported graph costs what the training path does, but a patch whose
                expert is full moves to another and predictions depend on the batch. Settable on a built layer.
                Not for ``choice='expert'``, whose eval picks as its training does.
            mix_conv: 1x1 conv after the weighted sum; None = on when num_experts > 1.
            attention: add a deformable-attention residual after mixing (switch with ``set_attention``).
            attn_heads: heads of the attention module.
            track_routing: keep routing results on the module after each forward.
            choice: 'token' (each patch picks its ``top_k`` experts) or 'expert' (expert choice, Zhou et al.
                2022: in every image, each expert picks its ``ceil(capacity_factor * n * top_k / E)`` most probable
                patches, in training and eval; a patch's weights are its router probabilities of the experts
                that picked it, renormalised to sum to 1 with a detached normaliser (see
                :func:`.dispatch.expert_choice`); a patch no expert picked gets no expert output, counted in
                ``dropped_fraction``). Needs an int ``top_k``. Settable on a built layer.
            balance: 'loss' (the Switch load-balance aux loss, weighted by the recipe) or 'bias' (loss-free
                balancing, token choice only: the ``balance_bias`` buffer [E] is added to the log-scores that
                choose the experts, never to the mixing weights, and is updated outside the graph after every
                optimizer step by ``bias_update``; the load-balance loss is then off for this layer). Expert
                choice applies no load-balance loss either. Settable.
            bias_update_rate: the largest step of that update, in logit units.
            bias_update: how the bias moves after a step, from the step's loads (see
                :func:`pce_timm.train.balance.update_balance_bias`): 'proportional',
                ``bias += bias_update_rate * clamp((mean load - load) / mean load, -1, 1)``, which stops moving
                at balance, or 'sign' (default; Wang et al. 2024, DeepSeek-V3), ``bias += bias_update_rate *
                sign(mean load - load)``, which moves every expert by the full step every update. Settable.
            patch_grid: instead of ``patch_size``: the patch grid (int or (rows, cols)), patches per side of the
                layer's output map. The patch size is derived from each input's map at forward time
                (:func:`.patches.grid_patch_size`: ``ceil(ceil(size / stride) / grid) * stride`` pixels, from
                the shapes as Python ints, so graphs stay static), so the layer routes the same grid at every
                input size (at most that grid: a map smaller than it gets one output pixel per patch). Not
                together with ``patch_size``.
            device, dtype: where and in which dtype to build parameters and buffers (timm's factory kwargs).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_arguments(
            in_chs, out_chs, kernel_size, stride, num_experts, top_k, router, embed_chs, capacity_factor,
            eval_capacity_factor, gumbel_tau, choice, balance, bias_update_rate, bias_update)
        fixed_patch, patch_grid = _check_patches(patch_size, patch_grid, stride)
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.num_experts = num_experts
        # the patch in pixels: the fixed one, or with patch_grid the one of the last forward ((0, 0) before any)
        self.patch_size: Tuple[int, int] = (0, 0) if fixed_patch is None else fixed_patch
        self.patch_grid = patch_grid
        self.layer_name = ''  # the layer's name in its model, for messages (set by the PCE models)
        self.warned_single_patch = False  # the 1x1-grid warning is given once per layer
        self.soft = top_k is None
        self.top_k = num_experts if top_k is None else top_k
        self.router_name = router
        self.router_noise_std = router_noise_std
        self.gumbel_tau = gumbel_tau
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.choice = choice
        self.balance = balance
        self.bias_update_rate = float(bias_update_rate)
        self.bias_update = bias_update
        self.track_routing = track_routing
        self.routing_mode = 'router'

        self.embed = PatchEmbedSPP(in_chs, embed_chs, spp_levels, **dd) if router_needs_embeddings(router) else None
        embed_dim = self.embed.embed_dim if self.embed is not None else 0
        self.router = create_router(
            router, embed_dim, num_experts, temperature=router_temperature, noise_std=router_noise_std,
            hidden_dim=router_hidden_dim, **dd)
        self.experts = ConvExperts(num_experts, in_chs, out_chs, kernel_size=kernel_size, stride=stride, **dd)
        if mix_conv is None:
            mix_conv = num_experts > 1
        self.mix = nn.Conv2d(out_chs, out_chs, 1, **dd) if mix_conv else nn.Identity()
        self.attn = DeformableAttention2d(out_chs, num_heads=attn_heads, **dd) if attention else None
        self.attn_enabled = True  # a plain bool: attention switched off does not run (see set_attention)
        # Added to every expert's router logit whatever produces the logits. Zero unless expert surgery
        # duplicated an expert under soft routing: both copies get log(1/2), so they split the original's
        # probability and the layer's output is unchanged (see pce_timm.analysis.surgery).
        self.register_buffer('logit_bias', torch.zeros(num_experts, **dd))
        # Loss-free balancing (balance='bias'): added to the scores that choose experts only, never to the
        # weights; kept apart from logit_bias, which does change the weights. Zero (and unused) otherwise. In the
        # state dict only for layers built with balance='bias', so every other layer's keys are unchanged (a
        # phase that switches a layer to the bias trains it, but checkpoints of that phase do not keep it).
        self.balance_bias_saved = balance == 'bias'
        self.register_buffer('balance_bias', torch.zeros(num_experts, **dd), persistent=self.balance_bias_saved)
        # forward passes every dispatch the patch size of its input, so the constructor's only matters for callers
        # of the dispatch modules themselves
        dispatch_patch = (1, 1) if fixed_patch is None else fixed_patch
        self.soft_dispatch = SoftDispatch(dispatch_patch)
        self.slot_dispatch = SlotDispatch(dispatch_patch)
        self.sorted_dispatch = SortedDispatch(dispatch_patch)
        self.expert_choice_dispatch = ExpertChoiceDispatch(dispatch_patch)

        self.last_router_logits = None
        self.last_routing_weights = None
        self.last_expert_indices = None
        self.last_embeddings = None
        self.last_expert_mask = None
        self.last_grid_size: Tuple[int, int] = (0, 0)

    def set_routing_mode(self, mode: str) -> None:
        """'router' (the configured router), or override it with 'positional' (+ noise) or 'uniform'.

        The overrides are the stabilisation options of training phase 1; the router's own parameters keep
        their values and are simply not used while an override is on.
        """
        if mode not in ROUTING_MODES:
            raise ValueError(f'routing mode must be one of {ROUTING_MODES}, got {mode!r}')
        self.routing_mode = mode

    def set_attention(self, enabled: bool) -> None:
        """Switch the attention residual on or off (no-op without an attention module). Off, it does not run."""
        self.attn_enabled = bool(enabled)

    @property
    def attn_gate(self) -> torch.Tensor:
        """1.0 while attention is switched on, else 0.0 (read-only; the old buffer's name: use ``attn_enabled``)."""
        return torch.tensor(1.0 if self.attn_enabled else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'PCEConv2d expects a 4D input [B, C, H, W], got {x.dim()}D {list(x.shape)}')
        if x.shape[1] != self.in_chs:
            raise ValueError(f'PCEConv2d expects in_chs={self.in_chs} input channels, got {x.shape[1]}')
        b, _, h, w = x.shape
        # under torch.jit.trace (the TorchScript ONNX exporter) sizes are traced values; the map's h, w are fixed in
        # such a graph (only the batch may be dynamic), so the patch derived from them is a constant
        patch = self.patch_size_for(int(h), int(w)) if torch.jit.is_tracing() else self.patch_size_for(h, w)
        if self.patch_grid is not None and not is_exporting():  # an exported graph has no module state
            self.patch_size = patch
        grid = grid_size(h, w, patch)
        if not torch.jit.is_scripting():
            self._check_patch(patch, h, w)
            if grid[0] * grid[1] == 1 and not self.warned_single_patch and not is_tracing():
                self._warn_single_patch(patch, h, w)
        if b == 0:  # as nn.Conv2d: an empty batch gives an empty batch
            return self._empty_output(x)
        positions = patch_positions(grid, x.device)
        if self.embed is not None:
            embeddings = self.embed(x, patch)
        else:
            embeddings = x.new_zeros(b, grid[0] * grid[1], 0)
        router_logits = self._router_logits(embeddings, positions) + self.logit_bias.float()  # [b, n, e]
        n = grid[0] * grid[1]
        expert_mask: Optional[torch.Tensor] = None
        if self.choice == 'expert':
            capacity = expert_choice_capacity(n, self.num_experts, self.top_k, self.capacity_factor)
            chosen = expert_choice(router_logits, capacity, self.gumbel_tau, self.training)
            out = self._mix_rows(self.expert_choice_dispatch(x, chosen, self.experts, patch))
            expert_mask = chosen.expert_mask  # [b, n, e]
            # by expert id; per patch its most probable picking expert (its most probable one when dropped)
            routing_weights = torch.zeros_like(router_logits.transpose(1, 2)).scatter(
                2, chosen.patch_indices, chosen.weights).transpose(1, 2)
            probs = router_logits.detach().softmax(-1)
            best_picked = torch.where(expert_mask, probs, -1.0).argmax(-1)
            expert_indices = torch.where(expert_mask.any(-1), best_picked, probs.argmax(-1)).unsqueeze(-1)
        else:
            choice_bias = self.balance_bias if self.balance == 'bias' else None
            _, expert_indices, routing_weights = route(
                router_logits.reshape(-1, self.num_experts), self.top_k, self.gumbel_tau, self.training, choice_bias)
            routing = Routing(expert_indices, routing_weights)
            if self.soft:
                out = self.mix(self.soft_dispatch(x, routing, self.experts, patch))
            else:
                out = self._mix_rows(self._dispatch_sparse(x, routing, patch))
        if self.track_routing and not is_exporting():  # an exported graph has no module state
            self.last_router_logits = router_logits
            self.last_routing_weights = routing_weights.reshape(b, n, -1)
            self.last_expert_indices = expert_indices.reshape(b, n, -1)
            self.last_expert_mask = expert_mask
            self.last_embeddings = embeddings
            self.last_grid_size = grid
        if x.is_contiguous() and not out.is_contiguous():
            # as nn.Conv2d: an NCHW input gives an NCHW output (the sparse path's rows are channels-last). Else
            # the next conv's weight gradient comes out channels-last, against the layout DDP's buckets expect
            out = out.contiguous()
        if self.attn is not None and self.attn_enabled:
            out = out + self.attn(out)
        return out

    def _router_logits(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The routing mode's logits [b, n, e]. Positional routing is one function for both the router and
        the mode: a positional router serves the mode itself (with its anchors, kept by expert surgery);
        any other router gets the default anchors for the layer's current ``num_experts``."""
        b = embeddings.shape[0]
        if self.routing_mode == 'uniform':
            return uniform_logits(b, positions.shape[0], self.num_experts, positions.device)
        if self.routing_mode == 'positional' and self.router_name != 'positional':
            return positional_logits(positions, b, self.num_experts, self.router_noise_std, self.training)
        return self.router(embeddings, positions)

    def _dispatch_sparse(self, x: torch.Tensor, routing: Routing, patch: Tuple[int, int]) -> torch.Tensor:
        """Pick the sparse discipline: slots while training, sorted in exact eager eval, else static slots.

        Returns output pixel rows [b, ho, wo, o].
        """
        exact = not self.training and self.eval_capacity_factor is None
        if exact and not x.is_meta:  # meta tensors hold no routing to size by
            # in a torch.compile graph the experts' runs are one custom op (see _compiled_sorted_eval)
            if not is_tracing() or self._compiled_sorted_eval():
                return self.sorted_dispatch(x, routing, self.experts, patch)
        return self.slot_dispatch(x, routing, self.experts, self._capacity(routing.expert_indices.shape[0]), patch)

    def patch_size_for(self, height: int, width: int) -> Tuple[int, int]:
        """The patch (h, w) in pixels this layer cuts a ``height x width`` input map into: ``patch_size``, or the
        one ``patch_grid`` gives that map (:func:`.patches.grid_patch_size`)."""
        patch_grid = self.patch_grid
        if patch_grid is not None:
            return grid_patch_size(height, width, patch_grid, self.stride)
        return self.patch_size

    def _describe(self) -> str:
        name = f'PCE layer {self.layer_name!r}' if self.layer_name else 'a PCEConv2d layer'
        return f'{name} ({self.in_chs} -> {self.out_chs} channels, stride {self.stride})'

    @torch.jit.unused
    def _check_patch(self, patch: Tuple[int, int], height: int, width: int) -> None:
        """ValueError for a patch whose padding would grow the map past :data:`MAX_PADDED_AREA` times its area."""
        grid = grid_size(height, width, patch)
        padded = grid[0] * patch[0] * grid[1] * patch[1]
        if padded <= MAX_PADDED_AREA * height * width:
            return
        out_h, out_w = (height - 1) // self.stride + 1, (width - 1) // self.stride + 1
        raise ValueError(
            f'{self._describe()}: patch_size {patch[0]}x{patch[1]} px is larger than its {height}x{width} px input '
            f'map (padded to {padded // (height * width)}x the map\'s area; at most {MAX_PADDED_AREA}x). Pass a patch '
            f'of at most {height}x{width} px (a PCE model\'s patch_size counts px of the stage\'s output map: at most '
            f'{out_h}x{out_w} here), or patch_grid (patches per side of the map) instead of patch_size.')

    @torch.jit.unused
    def _warn_single_patch(self, patch: Tuple[int, int], height: int, width: int) -> None:
        self.warned_single_patch = True
        warnings.warn(
            f'{self._describe()} routes a 1x1 patch grid: its {height}x{width} px input map is one patch of '
            f'{patch[0]}x{patch[1]} px, so routing picks experts per image, by content alone, and position '
            f'plays no part. Give it smaller patches (patch_size, or patch_grid: patches per side) or feed it a '
            f'larger map (larger images, or a model with less downsampling before it, e.g. stem_type=\'cifar\' '
            f'or PCE in earlier stages). Warned once per layer.', stacklevel=3)

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """The output [0, o, ho, wo] of an empty batch, through the experts' conv and BatchNorm (which in training
        counts the batch and keeps its statistics, as nn.BatchNorm2d does on an empty batch) and the mix."""
        out = self.experts.forward_dense(x)[:, :self.out_chs]
        return self.mix(out)

    @torch.jit.unused
    def _compiled_sorted_eval(self) -> bool:
        """Whether a ``torch.compile`` graph (not ``torch.export``) of exact eval runs the sorted discipline.

        It does without gradients and with BatchNorm running statistics: the experts' data-dependent runs are
        then one custom op (no backward), so the graph costs what eager eval does. Exported graphs (and eval
        with gradients) keep the static slots, a slot for every token at every expert.
        """
        bn = self.experts.bn
        return (torch.compiler.is_compiling() and not is_exporting() and not torch.jit.is_tracing()
                and not torch.is_grad_enabled() and bn.running_mean is not None
                and bn.running_var is not None)

    def _capacity(self, num_tokens: int) -> int:
        """Slots per expert of the slot discipline.

        While training: ``capacity_factor`` (a patch whose expert is full moves to a free slot of another one,
        so routing depends on the batch, as in Switch-style MoE training); in eval with ``eval_capacity_factor``
        set, that factor, the same way. Exact eval in a compiled or exported graph (or on meta tensors), whose
        sizes cannot depend on routing: every token, which always suffices, at up to E times the expert conv.
        """
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return num_tokens
        return expert_capacity(num_tokens, self.num_experts, self.top_k, factor)

    def _mix_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The mix of the sparse path's pixel rows [b, ho, wo, o] -> [b, o, ho, wo].

        With a 1x1 mix conv see :func:`.mix.mix_pixels`; without one the result is the rows seen as NCHW
        (channels-last memory).
        """
        b, ho, wo, o = rows.shape
        if torch.jit.is_scripting() or not isinstance(self.mix, nn.Conv2d):
            return self.mix(rows.permute(0, 3, 1, 2))
        return mix_pixels(rows.view(b, ho * wo, o), self.mix.weight, self.mix.bias, ho, wo)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fill_missing_buffer(self, state_dict, prefix, 'logit_bias')  # checkpoints from before the buffers
        if self.balance_bias_saved:
            fill_missing_buffer(self, state_dict, prefix, 'balance_bias')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.unused
    def uses_balance_loss(self) -> bool:
        """Whether the Switch load-balance aux loss applies to this layer: token choice with ``balance='loss'``."""
        return self.choice == 'token' and self.balance == 'loss'

    @torch.jit.unused
    def routing_stats(self) -> Dict[str, object]:
        """What routing did in the last forward: probabilities, choices, usage and balance.

        Returns ``router_probs`` [b, n, e], ``expert_indices`` [b, n, k] (most probable first), ``grid_size``,
        ``usage_counts`` [e] (top-1 choices; expert choice: the patches each expert processed, its load),
        ``usage_entropy`` (normalised: 1 = balanced), ``router_entropy`` (mean per-patch, nats), ``imbalance``
        (busiest / least used; inf if one is unused), ``dead_experts``; with expert choice also
        ``dropped_fraction`` (patches no expert picked) and with ``balance='bias'`` ``balance_bias`` (a list).
        For expert choice ``expert_indices`` [b, n, 1] is each patch's most probable picking expert (its most
        probable expert if none picked it) and ``expert_mask`` [b, n, e] says which experts picked it.
        """
        if self.last_router_logits is None or self.last_expert_indices is None:
            raise RuntimeError('no routing recorded yet: run a forward pass with track_routing=True first')
        probs = self.last_router_logits.detach().float().softmax(-1)
        mask = self.last_expert_mask
        counts = usage_counts(self.last_expert_indices, self.num_experts) if mask is None else expert_load(mask)
        extra: Dict[str, object] = {}
        if mask is not None:
            extra['expert_mask'] = mask.detach()
            extra['dropped_fraction'] = dropped_fraction(mask)
        if self.balance == 'bias':
            extra['balance_bias'] = [float(v) for v in self.balance_bias.tolist()]
        return {**extra, 
            'router_probs': probs,
            'expert_indices': self.last_expert_indices.detach(),
            'grid_size': self.last_grid_size,
            'usage_counts': counts,
            'usage_entropy': usage_entropy(counts),
            'router_entropy': mean_router_entropy(probs),
            'imbalance': imbalance(counts),
            'dead_experts': dead_experts(counts),
        }

    def extra_repr(self) -> str:
        top_k = 'soft' if self.soft else f'top_k={self.top_k}'
        extra = '' if self.choice == 'token' else f', choice={self.choice}'
        extra += '' if self.balance == 'loss' else f', balance={self.balance}, bias_update={self.bias_update}'
        patches = f'patch_size={self.patch_size}' if self.patch_grid is None else f'patch_grid={self.patch_grid}'
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'num_experts={self.num_experts}, {patches}, {top_k}, router={self.router_name}'
                f'{extra}')

