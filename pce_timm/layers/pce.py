"""PCEConv2d: Positional Convolution Experts as a drop-in replacement for a Conv-BN-ReLU.

The map is cut into patches; each patch is embedded (features + coordinates, spatial pyramid pooling),
routed by content and position to E experts (Conv-BN-ReLU), and the experts' outputs are summed with the
router's weights, mixed by a 1x1 conv and optionally passed through deformable attention.

Two dispatch paths give the same answer where they overlap:
- soft (``top_k=None``): every expert on every pixel, one conv with E x out_chs channels;
- sparse (``top_k=k``): every patch only to its k experts. While training, halo windows are gathered into
  per-expert slots of a static capacity, one grouped conv runs all experts, and the results are gathered back
  to pixels with their weights. In eval the patches are sorted by expert and each expert convolves just its
  own, so nothing depends on the rest of the batch.

``forward`` returns a Tensor. What routing did is kept on the module (``last_router_logits``,
``last_expert_indices``, ...) for aux losses (:mod:`.losses`) and statistics (:meth:`routing_stats`).

Shape legend: b batch, c/o in/out channels, h/w input map, ho/wo output map, n patches, e experts,
k top-k, d embedding dim, t = b * n tokens, s slots per expert (capacity).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models import register_notrace_module

from .attention import DeformableAttention2d
from .dispatch import assign_slots, expert_capacity, route
from .embed import PatchEmbedSPP
from .experts import ConvExperts
from .gather import gather_rows, gather_rows_top1, gather_windows, gather_windows_plain
from .mix import mix_pixels
from .patches import grid_size, halo, patch_positions, pixel_patch_index, window_index
from .routers import (
    ROUTERS,
    create_router,
    fill_missing_buffer,
    positional_logits,
    router_needs_embeddings,
    uniform_logits,
)
from .routing_stats import dead_experts, imbalance, mean_router_entropy, usage_counts, usage_entropy

ROUTING_MODES = ('router', 'positional', 'uniform')


def _is_exporting() -> bool:
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting()


def _is_tracing() -> bool:
    """Inside torch.compile or torch.export, where sizes must not depend on tensor values."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _weighted_sum(gathered: torch.Tensor, pixel_weight: torch.Tensor) -> torch.Tensor:
    """Sum over choices of gathered rows [k, m, o] times their weights [k, m] -> [m, o]."""
    if gathered.shape[0] == 1:  # static: skip the reduction copy
        return gathered[0] * pixel_weight[0].unsqueeze(-1)
    return (gathered * pixel_weight.unsqueeze(-1)).sum(0)


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'{name} must be an int >= 1, got {value!r}')


@register_notrace_module  # routing is data-dependent: torch.fx keeps the layer as one leaf call
class PCEConv2d(nn.Module):
    last_router_logits: Optional[torch.Tensor]
    last_routing_weights: Optional[torch.Tensor]
    last_expert_indices: Optional[torch.Tensor]
    last_embeddings: Optional[torch.Tensor]
    eval_capacity_factor: Optional[float]

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            num_experts: int = 4,
            patch_size: Union[int, Tuple[int, int]] = 8,
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
    ):
        """
        Args:
            in_chs, out_chs, kernel_size, stride: as for ``nn.Conv2d`` (padding is ``kernel_size // 2``).
            num_experts: E, the number of Conv-BN-ReLU experts.
            patch_size: routing unit (int or (h, w)) on the input map; a multiple of ``stride``.
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
                experts, whatever the rest of the batch routes (see :meth:`_forward_sparse_eval`; a compiled or
                exported graph then holds a slot per token at every expert). A number: slots per expert as in
                training, so a compiled or exported graph costs what the training path does, but a patch whose
                expert is full moves to another and predictions depend on the batch. Settable on a built layer.
            mix_conv: 1x1 conv after the weighted sum; None = on when num_experts > 1.
            attention: add a deformable-attention residual after mixing (switch with ``set_attention``).
            attn_heads: heads of the attention module.
            track_routing: keep routing results on the module after each forward.
        """
        super().__init__()
        for name, value in (('in_chs', in_chs), ('out_chs', out_chs), ('kernel_size', kernel_size),
                            ('stride', stride), ('num_experts', num_experts), ('embed_chs', embed_chs)):
            _check_positive_int(name, value)
        patch_size = to_2tuple(patch_size)
        for size in patch_size:
            _check_positive_int('patch_size', size)
            if size % stride != 0:
                raise ValueError(f'patch_size {patch_size} must be a multiple of stride={stride}')
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

        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.num_experts = num_experts
        self.patch_size: Tuple[int, int] = (int(patch_size[0]), int(patch_size[1]))
        self.soft = top_k is None
        self.top_k = num_experts if top_k is None else top_k
        self.router_name = router
        self.router_noise_std = router_noise_std
        self.gumbel_tau = gumbel_tau
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.track_routing = track_routing
        self.routing_mode = 'router'

        self.embed = PatchEmbedSPP(in_chs, embed_chs, spp_levels) if router_needs_embeddings(router) else None
        embed_dim = self.embed.embed_dim if self.embed is not None else 0
        self.router = create_router(
            router, embed_dim, num_experts, temperature=router_temperature, noise_std=router_noise_std,
            hidden_dim=router_hidden_dim)
        self.experts = ConvExperts(num_experts, in_chs, out_chs, kernel_size=kernel_size, stride=stride)
        if mix_conv is None:
            mix_conv = num_experts > 1
        self.mix = nn.Conv2d(out_chs, out_chs, 1) if mix_conv else nn.Identity()
        self.attn = DeformableAttention2d(out_chs, num_heads=attn_heads) if attention else None
        self.register_buffer('attn_gate', torch.ones(()), persistent=False)
        # Added to every expert's router logit whatever produces the logits. Zero unless expert surgery
        # duplicated an expert under soft routing: both copies get log(1/2), so they split the original's
        # probability and the layer's output is unchanged (see pce_timm.analysis.surgery).
        self.register_buffer('logit_bias', torch.zeros(num_experts))

        self.last_router_logits = None
        self.last_routing_weights = None
        self.last_expert_indices = None
        self.last_embeddings = None
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
        """Switch the attention residual on or off (no-op without an attention module)."""
        self.attn_gate.fill_(1.0 if enabled else 0.0)

    def _router_logits(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b = embeddings.shape[0]
        if self.routing_mode == 'uniform':
            return uniform_logits(b, positions.shape[0], self.num_experts, positions.device)
        if self.routing_mode == 'positional':
            return positional_logits(positions, b, self.num_experts, self.router_noise_std, self.training)
        return self.router(embeddings, positions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'PCEConv2d expects a 4D input [B, C, H, W], got {x.dim()}D {list(x.shape)}')
        if x.shape[1] != self.in_chs:
            raise ValueError(f'PCEConv2d expects in_chs={self.in_chs} input channels, got {x.shape[1]}')
        b, _, h, w = x.shape
        grid = grid_size(h, w, self.patch_size)
        n = grid[0] * grid[1]
        positions = patch_positions(grid, x.device)
        if self.embed is not None:
            embeddings = self.embed(x, self.patch_size)
        else:
            embeddings = x.new_zeros(b, n, 0)
        router_logits = self._router_logits(embeddings, positions) + self.logit_bias.float()  # [b, n, e]
        _, expert_indices, routing_weights = route(
            router_logits.reshape(b * n, self.num_experts), self.top_k, self.gumbel_tau, self.training)
        if self.soft:
            out = self.mix(self._forward_soft(x, expert_indices, routing_weights))
        else:
            out = self._mix_rows(self._forward_sparse(x, expert_indices, routing_weights), h, w)
        if self.track_routing and not _is_exporting():  # an exported graph has no module state
            self.last_router_logits = router_logits
            self.last_routing_weights = routing_weights.reshape(b, n, -1)
            self.last_expert_indices = expert_indices.reshape(b, n, -1)
            self.last_embeddings = embeddings
            self.last_grid_size = grid
        if self.attn is not None:
            out = out + self.attn_gate * self.attn(out)
        return out

    def _mix_rows(self, rows: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The mix of the sparse path's pixel rows [b, ho * wo, o] -> [b, o, ho, wo].

        With a 1x1 mix conv the result is a contiguous NCHW map (:func:`mix_pixels`); without one it is
        the rows seen as NCHW (channels-last memory).
        """
        b, ho, wo = rows.shape[0], self._out_size(h), self._out_size(w)
        if torch.jit.is_scripting() or not isinstance(self.mix, nn.Conv2d):
            return self.mix(rows.view(b, ho, wo, -1).permute(0, 3, 1, 2))
        return mix_pixels(rows, self.mix.weight, self.mix.bias, ho, wo)

    def _out_size(self, size: int) -> int:
        return (size - 1) // self.stride + 1  # same padding: ceil(size / stride)

    def _out_patch_size(self) -> Tuple[int, int]:
        return self.patch_size[0] // self.stride, self.patch_size[1] // self.stride

    def _forward_soft(
            self,
            x: torch.Tensor,
            expert_indices: torch.Tensor,
            routing_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Every expert on every pixel, summed with each pixel's patch weights: [b, c, h, w] -> [b, o, ho, wo]."""
        b, e, o = x.shape[0], self.num_experts, self.out_chs
        routing_weights = torch.zeros_like(routing_weights).scatter(1, expert_indices, routing_weights)  # by id
        y = self.experts.forward_dense(x)  # [b, e * o, ho, wo]
        ho, wo = y.shape[-2], y.shape[-1]
        patch_of_pixel = pixel_patch_index(ho, wo, self._out_patch_size(), x.device)[0].reshape(-1)
        n = routing_weights.shape[0] // b
        weight_map = routing_weights.to(y.dtype).reshape(b, n, e).index_select(1, patch_of_pixel)  # [b, ho*wo, e]
        weight_map = weight_map.transpose(1, 2).reshape(b, e, 1, ho, wo)
        return (y.reshape(b, e, o, ho, wo) * weight_map).sum(1)

    def _window_pixels(self, x: torch.Tensor, token_of_slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The flat input pixel read by every slot's halo window: [s, wh, ww, e] (``b * h * w`` = zero)."""
        b, _, h, w = x.shape
        window = window_index(h, w, self.patch_size, self.kernel_size, self.stride, x.device)  # [n, wh, ww]
        n = window.shape[0]
        filled = token_of_slot < num_tokens  # [s, e]
        token = token_of_slot.clamp(max=num_tokens - 1)
        pixel = window[token % n]  # [s, e, wh, ww]
        inside = (pixel < h * w) & filled.unsqueeze(-1).unsqueeze(-1)
        pixel = torch.where(inside, (token // n).unsqueeze(-1).unsqueeze(-1) * (h * w) + pixel, b * h * w)
        return pixel.permute(0, 2, 3, 1)

    def _valid_outputs(self, token_of_slot: torch.Tensor, num_tokens: int, n: int, ho: int, wo: int) -> torch.Tensor:
        """Which output pixels of each slot are real: [s, e, ph, pw] (False for empty slots and padding)."""
        ph, pw = self._out_patch_size()
        patch_of_pixel = pixel_patch_index(ho, wo, (ph, pw), token_of_slot.device)[0]
        gh, gw = grid_size(ho, wo, (ph, pw))
        inside = torch.zeros(gh * ph, gw * pw, dtype=torch.bool, device=token_of_slot.device)
        inside[:ho, :wo] = patch_of_pixel >= 0
        inside = inside.view(gh, ph, gw, pw).permute(0, 2, 1, 3).reshape(n, ph, pw)
        filled = token_of_slot < num_tokens  # [s, e]
        return inside[token_of_slot % n] & filled.unsqueeze(-1).unsqueeze(-1)

    def _output_rows(
            self,
            slot_of_assignment: torch.Tensor,
            assignment_of_slot: torch.Tensor,
            pixel_token: torch.Tensor,
            capacity: int,
            b: int,
            ho: int,
            wo: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Index maps between expert-output rows and (choice, output pixel) rows.

        Expert outputs [s, e * o, ph, pw] (channels-last) are rows ``((slot * ph + i) * pw + j) * e + expert``
        of ``o`` values. Returns ``index`` [k, b * ho * wo]: the row each output pixel reads for each choice
        (0 where the choice was dropped; its weight is zeroed), and ``inverse`` [s * ph * pw * e]: the
        (choice, pixel) row that reads each expert-output row, ``k * b * ho * wo`` for none.
        ``pixel_token`` [b * ho * wo] is the token of every output pixel.
        """
        e, k = self.num_experts, slot_of_assignment.shape[0]
        ph, pw = self._out_patch_size()
        device = slot_of_assignment.device
        num_tokens = slot_of_assignment.shape[1]
        n = num_tokens // b
        gw = (wo + pw - 1) // pw
        offset = pixel_patch_index(ho, wo, (ph, pw), device)[1]
        pixel_slot = slot_of_assignment[:, pixel_token]  # [k, b*ho*wo]
        row = ((pixel_slot % capacity) * (ph * pw) + offset.reshape(1, -1).repeat(1, b)) * e + pixel_slot // capacity
        index = torch.where(pixel_slot < e * capacity, row, torch.zeros_like(row))

        num_pixels = b * ho * wo
        assignment = assignment_of_slot.view(e, capacity).t().reshape(capacity, 1, 1, e)  # [s, 1, 1, e]
        filled = assignment < k * num_tokens
        token_of_row = assignment % num_tokens
        patch = token_of_row % n
        y = (patch // gw) * ph + torch.arange(ph, device=device).view(1, ph, 1, 1)
        x = (patch % gw) * pw + torch.arange(pw, device=device).view(1, 1, pw, 1)
        pixel = (token_of_row // n) * (ho * wo) + y * wo + x
        inverse = (assignment // num_tokens) * num_pixels + pixel
        inverse = torch.where(filled & (y < ho) & (x < wo), inverse, k * num_pixels)
        return index, inverse.reshape(-1)

    def _pixel_tokens(
            self, b: int, n: int, ho: int, wo: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The token (``image * n + patch``) of every output pixel [b * ho * wo]; its offset in the patch [ho, wo]."""
        patch_of_pixel, offset = pixel_patch_index(ho, wo, self._out_patch_size(), device)
        return (torch.arange(b, device=device).view(b, 1, 1) * n + patch_of_pixel).reshape(-1), offset

    def _capacity(self, num_tokens: int) -> int:
        """Slots per expert of the batched sparse path.

        While training: ``capacity_factor`` (a patch whose expert is full moves to a free slot of another one,
        so routing depends on the batch, as in Switch-style MoE training); in eval with ``eval_capacity_factor``
        set, that factor, the same way. Exact eval in a compiled or exported graph (or on meta tensors), whose
        sizes cannot depend on routing: every token, which always suffices, at up to E times the expert conv.
        Exact eager eval takes :meth:`_forward_sparse_eval` instead.
        """
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return num_tokens
        return expert_capacity(num_tokens, self.num_experts, self.top_k, factor)

    def _forward_sparse_eval(
            self,
            x: torch.Tensor,
            expert_indices: torch.Tensor,
            routing_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Eval: every patch through exactly its chosen experts, each expert on just its own patches.

        The (choice, patch) assignments are sorted by expert and every expert convolves its run of halo windows
        (sizes read from the routing: eager and TorchScript only). No capacity, so no patch is moved to another
        expert and an image's output never depends on the rest of its batch. Returns pixel rows [b, ho * wo, o].
        """
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        e, k, o = self.num_experts, self.top_k, self.out_chs
        num_tokens = expert_indices.shape[0]
        n = num_tokens // b
        chosen = expert_indices.t().reshape(-1)  # [a], choice-major: assignment = choice * t + token
        order = torch.argsort(chosen, stable=True)
        counts: List[int] = torch.bincount(chosen, minlength=e).tolist()
        pixels = self._window_pixels(x, (order % num_tokens).unsqueeze(1), num_tokens)  # [a, wh, ww, 1]
        y = self.experts.forward_sorted(gather_windows_plain(x, pixels), counts)  # [a, o, ph, pw]
        ho, wo = self._out_size(h), self._out_size(w)
        ph, pw = self._out_patch_size()
        pixel_token, offset = self._pixel_tokens(b, n, ho, wo, x.device)
        position = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=x.device))
        choice = torch.arange(k, device=x.device).view(k, 1) * num_tokens
        index = position[choice + pixel_token] * (ph * pw) + offset.reshape(1, -1).repeat(1, b)  # [k, b*ho*wo]
        gathered = F.embedding(index, y.permute(0, 2, 3, 1).reshape(-1, o))  # [k, b*ho*wo, o]
        if k == 1 and not (torch.is_grad_enabled() and routing_weights.requires_grad):
            return gathered[0].view(b, ho * wo, o)  # top-1 weights are exactly 1
        pixel_weight = routing_weights.t().to(y.dtype)[:, pixel_token]  # [k, b*ho*wo]
        return _weighted_sum(gathered, pixel_weight).view(b, ho * wo, o)

    def _forward_sparse(
            self,
            x: torch.Tensor,
            expert_indices: torch.Tensor,
            routing_weights: torch.Tensor,
    ) -> torch.Tensor:
        """Each patch through its k experts only (gather windows -> grouped conv -> weighted gather back).

        Returns the output as pixel rows [b, ho * wo, o].
        """
        exact = not self.training and self.eval_capacity_factor is None
        if exact and not _is_tracing() and not x.is_meta:  # meta tensors hold no routing to size by
            return self._forward_sparse_eval(x, expert_indices, routing_weights)
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        e, k, o = self.num_experts, self.top_k, self.out_chs
        num_tokens = expert_indices.shape[0]
        n = num_tokens // b
        capacity = self._capacity(num_tokens)
        slot_of_assignment, assignment_of_slot = assign_slots(expert_indices, e, capacity)  # [k, t], [e * s]
        token_of_slot = torch.where(  # [s, e]
            assignment_of_slot < k * num_tokens, assignment_of_slot % num_tokens, num_tokens).view(e, capacity).t()

        before, after = halo(self.kernel_size, self.stride)
        geometry = [capacity, e, self.patch_size[0], self.patch_size[1], before, after]
        pixels = self._window_pixels(x, token_of_slot, num_tokens)
        windows = gather_windows(x, pixels, slot_of_assignment, geometry)  # [s, e * c, wh, ww]
        ho, wo = self._out_size(h), self._out_size(w)
        ph, pw = self._out_patch_size()
        valid: Optional[torch.Tensor] = None
        if self.training and (capacity * e != k * num_tokens or ho % ph != 0 or wo % pw != 0):
            valid = self._valid_outputs(token_of_slot, num_tokens, n, ho, wo)
        y = self.experts.forward_windows(windows, valid)  # [s, e * o, ph, pw]

        pixel_token = self._pixel_tokens(b, n, ho, wo, x.device)[0]
        index, inverse = self._output_rows(slot_of_assignment, assignment_of_slot, pixel_token, capacity, b, ho, wo)
        rows = y.permute(0, 2, 3, 1).reshape(-1, o)
        may_drop = capacity * e < k * num_tokens  # static: some choices may have found no slot
        if k == 1 and not may_drop:  # every weight is p / stop_grad(p) == 1: only its gradient matters
            gathered = gather_rows_top1(rows, index.reshape(-1), inverse, routing_weights[:, 0], pixel_token)
            return gathered.view(b, ho * wo, o)
        gathered = gather_rows(rows, index.reshape(-1), inverse).view(k, b * ho * wo, o)
        pixel_weight = routing_weights.t().to(y.dtype)[:, pixel_token]  # [k, b*ho*wo]
        if may_drop:  # dropped choices add nothing
            pixel_weight = pixel_weight * (slot_of_assignment[:, pixel_token] < e * capacity).to(y.dtype)
        return _weighted_sum(gathered, pixel_weight).view(b, ho * wo, o)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fill_missing_buffer(self, state_dict, prefix, 'logit_bias')  # checkpoints from before the buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.unused
    def routing_stats(self) -> Dict[str, object]:
        """What routing did in the last forward: probabilities, choices, usage and balance.

        Returns ``router_probs`` [b, n, e], ``expert_indices`` [b, n, k] (most probable first), ``grid_size``,
        ``usage_counts`` [e] (top-1 choices), ``usage_entropy`` (normalised: 1 = balanced), ``router_entropy``
        (mean per-patch, nats), ``imbalance`` (busiest / least used; inf if one is unused), ``dead_experts``.
        """
        if self.last_router_logits is None or self.last_expert_indices is None:
            raise RuntimeError('no routing recorded yet: run a forward pass with track_routing=True first')
        probs = self.last_router_logits.detach().float().softmax(-1)
        counts = usage_counts(self.last_expert_indices, self.num_experts)
        return {
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
        return (f'{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, stride={self.stride}, '
                f'num_experts={self.num_experts}, patch_size={self.patch_size}, {top_k}, router={self.router_name}')

