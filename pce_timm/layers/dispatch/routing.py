"""Pure routing functions: router logits -> (probabilities, chosen experts, weights) -> expert slots.

:class:`Routing` carries token choice (each patch picks its top-k experts) to the dispatch modules;
:class:`ExpertChoice` carries expert choice (each expert picks its top-c patches of every image).

Shape legend: t tokens (patches, batch flattened), e experts, k top-k, c capacity (slots per expert),
a = k * t assignments (choice-major: every token's first choice, then every token's second, ...).

Static shapes throughout: capacities are Python ints computed from sizes, never from tensor values, so the
sparse path compiles with ``torch.compile(fullgraph=True)`` and exports.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


class Routing(NamedTuple):
    """What the router chose for every token (``image * n + patch``), the input of every dispatch.

    ``expert_indices`` [t, k] most probable first; ``routing_weights`` [t, k] their weights (top-1: exactly 1
    in value, with the router's gradient; soft: the probabilities, k = e).
    """
    expert_indices: torch.Tensor
    routing_weights: torch.Tensor


def route(
        router_logits: torch.Tensor,
        top_k: int,
        gumbel_tau: float = 0.0,
        training: bool = False,
        choice_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn router logits [..., e] into ``(router_probs, expert_indices, routing_weights)``.

    ``router_probs`` [..., e] is the softmax. Chosen experts are listed most probable first, so
    ``expert_indices[..., 0]`` is always the top-1 choice. With ``top_k == e`` (soft routing) every expert is
    chosen with its probability as weight. Otherwise the ``top_k`` most probable experts are chosen and their
    weights renormalised to sum to 1; the normaliser is detached so that top-1 routing (weight 1) still
    passes a gradient to the router (the straight-through estimator ``p / stop_grad(p)``).

    With ``gumbel_tau > 0`` while training, choices and weights come from a Gumbel-softmax sample instead.

    ``choice_bias`` [e] (loss-free balancing, Wang et al. 2024) is added to the log-scores that *choose* the
    experts only: the weights stay the (sample) probabilities of the chosen experts, renormalised as above,
    so the bias changes which experts a patch gets, never the value or gradient of a chosen expert's weight.
    """
    logits = router_logits.float()
    router_probs = logits.softmax(dim=-1)
    num_experts = logits.shape[-1]
    sample = router_probs
    gumbel = training and gumbel_tau > 0
    if gumbel:
        sample = F.gumbel_softmax(logits, tau=gumbel_tau, hard=False, dim=-1)
    k = min(top_k, num_experts)
    if choice_bias is None:
        top_values, expert_indices = sample.topk(k, dim=-1)
    else:  # log-scores: logits (up to a per-patch constant), or the log of the Gumbel sample
        scores = sample.clamp_min(1e-30).log() if gumbel else logits
        expert_indices = (scores + choice_bias.float()).topk(k, dim=-1).indices
        top_values = sample.gather(-1, expert_indices)
    if top_k >= num_experts:
        return router_probs, expert_indices, top_values
    routing_weights = top_values / top_values.sum(dim=-1, keepdim=True).detach()
    return router_probs, expert_indices, routing_weights


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * t * k / e)``, at least 1, at most ``t``."""
    capacity = int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))
    return max(1, min(num_tokens, capacity))


class ExpertChoice(NamedTuple):
    """What every expert chose in every image (see :func:`expert_choice`), the input of expert-choice dispatch.

    ``patch_indices`` [b, e, c]: the patches (0..n-1 within the image) expert j picked, best first;
    ``weights`` [b, e, c]: their weights; ``expert_mask`` [b, n, e]: whether expert j picked patch i.
    """
    patch_indices: torch.Tensor
    weights: torch.Tensor
    expert_mask: torch.Tensor


def expert_choice_capacity(num_patches: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Patches each expert picks per image: ``ceil(capacity_factor * n * k / e)``, at least 1, at most ``n``.

    A Python int of sizes only, so the expert-choice path has static shapes.
    """
    capacity = int(math.ceil(capacity_factor * num_patches * top_k / num_experts))
    return max(1, min(num_patches, capacity))


def expert_choice(
        router_logits: torch.Tensor,
        capacity: int,
        gumbel_tau: float = 0.0,
        training: bool = False,
) -> ExpertChoice:
    """Expert choice routing (Zhou et al. 2022) within each image: router logits [b, n, e] -> :class:`ExpertChoice`.

    Every expert picks the ``capacity`` patches of each image with the highest router probability for it
    (softmax over the experts, as in the paper; a Gumbel-softmax sample while training with ``gumbel_tau > 0``).
    Choices never look at the other images of the batch. A patch's weight for an expert that picked it is that
    probability divided by the (detached) sum of the probabilities of all experts that picked the patch: the
    weights of a picked patch sum to 1, as token choice's do, so the output's scale does not shrink with
    e; a patch picked by one expert gets weight exactly 1 in value, with the router's gradient (``p /
    stop_grad(p)``, as top-1 token choice). A patch no expert picked gets no expert output.
    """
    logits = router_logits.float()
    b, n, e = logits.shape
    probs = logits.softmax(dim=-1)
    if training and gumbel_tau > 0:
        probs = F.gumbel_softmax(logits, tau=gumbel_tau, hard=False, dim=-1)
    by_expert = probs.transpose(1, 2)  # [b, e, n]
    patch_indices = by_expert.topk(capacity, dim=-1).indices  # [b, e, c]
    picked = torch.zeros_like(by_expert).scatter(2, patch_indices, 1.0)  # [b, e, n]
    total = (by_expert * picked).sum(1).detach()  # [b, n]: probability mass of the experts that picked each patch
    total = total.clamp_min(1e-30)  # float32 logits; only picked patches are read
    weights = by_expert.gather(2, patch_indices) / total.gather(1, patch_indices.reshape(b, -1)).view(b, e, capacity)
    return ExpertChoice(patch_indices, weights, picked.transpose(1, 2) > 0)


def assign_slots(
        expert_indices: torch.Tensor,
        num_experts: int,
        capacity: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give every (token, choice) a slot in its expert's buffer of ``capacity`` slots.

    Args:
        expert_indices: chosen experts [t, k].
        num_experts: e.
        capacity: slots per expert (see :func:`expert_capacity`).

    Returns:
        ``slot_of_assignment`` [k, t]: the slot (``expert * capacity + position``) each choice landed in,
        ``e * capacity`` if it was dropped; and ``assignment_of_slot`` [e * capacity]: the assignment
        (``choice * t + token``) in each slot, ``k * t`` if the slot is empty.

    First choices claim slots before second choices, and earlier tokens before later ones. A choice that
    finds its expert full is rerouted to the first free slot of any expert instead of being dropped, so with
    ``capacity_factor >= 1`` no patch ever loses its output; it is dropped only when every slot is taken.
    """
    num_tokens, top_k = expert_indices.shape
    num_slots = num_experts * capacity
    device = expert_indices.device
    chosen = expert_indices.t().reshape(-1)  # [a], choice-major
    one_hot = F.one_hot(chosen, num_experts)  # [a, e]
    position = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # rank of each choice within its expert
    kept = position < capacity
    filled = one_hot.sum(0).clamp(max=capacity)  # [e]

    slot_ids = torch.arange(num_slots, device=device)
    free = (torch.arange(capacity, device=device).view(1, capacity) >= filled.view(num_experts, 1)).view(-1)
    free_rank = torch.where(free, free.long().cumsum(0) - 1, torch.full_like(slot_ids, num_slots))
    free_slot_by_rank = torch.full((num_slots + 1,), num_slots, dtype=torch.long, device=device)
    free_slot_by_rank = free_slot_by_rank.scatter(0, free_rank, slot_ids)
    free_slot_by_rank[num_slots] = num_slots  # the dump position for occupied slots above
    overflow_rank = ((~kept).long().cumsum(0) - 1).clamp(min=0, max=num_slots)
    slot = torch.where(kept, chosen * capacity + position, free_slot_by_rank[overflow_rank])

    assignments = torch.arange(top_k * num_tokens, device=device)
    assignment_of_slot = torch.full((num_slots + 1,), top_k * num_tokens, dtype=torch.long, device=device)
    assignment_of_slot = assignment_of_slot.scatter(0, slot, assignments)[:num_slots]
    return slot.view(top_k, num_tokens), assignment_of_slot
