"""Auxiliary routing losses as pure functions of router logits and choices, and their collection.

Shape legend: t tokens (patches, any leading dims flattened), e experts, k top-k.
The seed's objective is ``L = CE + lambda * L_entropy``; we add Switch-style load balance and the router
z-loss (ST-MoE) so balance is trained, not hoped for. Each function is minimal where it should be:
- :func:`router_entropy_loss`: 0 for confident (one-hot) routing, log(e) for uniform;
- :func:`load_balance_loss`: 1 for perfectly balanced routing, e when one expert takes everything;
- :func:`router_z_loss`: small when logits stay small.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn


def router_entropy_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-patch entropy of the routing distribution (natural log)."""
    log_probs = router_logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def load_balance_loss(router_logits: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss ``e * sum_j f_j * P_j``.

    ``f_j`` is the share of patches whose first choice is expert j (no gradient), ``P_j`` the mean router
    probability of expert j (carries the gradient). ``expert_indices`` [..., k] list the chosen experts most
    probable first (as :func:`.dispatch.route` returns them); only the first choice counts.
    """
    num_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(-1).reshape(-1, num_experts)
    first_choice = expert_indices[..., 0].reshape(-1)
    share = torch.zeros(num_experts, device=probs.device).index_add_(
        0, first_choice, torch.ones_like(first_choice, dtype=torch.float32)) / first_choice.numel()
    return num_experts * (share * probs.mean(0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits (keeps them from growing without bound)."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


@dataclass(frozen=True)
class AuxLossWeights:
    """Weights of the aux losses in the total; 0 switches a loss off (it is still reported)."""
    entropy: float = 0.0
    balance: float = 0.01
    z_loss: float = 0.0


def collect_aux_loss(
        model: nn.Module,
        weights: AuxLossWeights = AuxLossWeights(),
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Weighted aux loss of every PCE layer's last forward, averaged over layers, and the raw parts.

    Returns ``(total, parts)``, ``parts`` holding the layer means of 'entropy', 'balance' and 'z_loss'.
    A model without PCE layers (or without a recorded forward) gives zeros.

    The load-balance loss enters the total only for layers that balance by it (``layer.uses_balance_loss()``:
    token choice with ``balance='loss'``); layers balanced by construction (expert choice) or by the loss-free
    bias (``balance='bias'``) still report it in ``parts`` but add nothing: the total is
    ``weights.balance * sum(balance of those layers) / layers``, as if their term were 0.
    """
    from .pce import PCEConv2d  # local import: pce imports nothing from here, but keep the module pure

    entropy, balance, balance_used, z_loss, count = [], [], [], [], 0
    for module in model.modules():
        if isinstance(module, PCEConv2d) and module.last_router_logits is not None:
            logits = module.last_router_logits
            entropy.append(router_entropy_loss(logits))
            balance.append(load_balance_loss(logits, module.last_expert_indices))
            if module.uses_balance_loss():
                balance_used.append(balance[-1])
            z_loss.append(router_z_loss(logits))
            count += 1
    device = next(model.parameters()).device
    if count == 0:
        zero = torch.zeros((), device=device)
        return zero, {'entropy': zero, 'balance': zero, 'z_loss': zero}
    parts = {
        'entropy': torch.stack(entropy).mean(),
        'balance': torch.stack(balance).mean(),
        'z_loss': torch.stack(z_loss).mean(),
    }
    balance_term = parts['balance'] if len(balance_used) == count else (
        torch.stack(balance_used).sum() / count if balance_used else torch.zeros((), device=device))
    total = weights.entropy * parts['entropy'] + weights.balance * balance_term + weights.z_loss * parts['z_loss']
    return total, parts
