"""Routers: patch embeddings (+ patch positions) -> router logits, always float32.

Every router has the same interface, ``forward(embeddings [b, n, d], positions [n, 2]) -> logits [b, n, e]``,
and does nothing else: probabilities, top-k, Gumbel sampling and dispatch live in :mod:`.dispatch`.

Shape legend: b batch, n patches, d embedding dim, e experts, m embeddings used to fit keys.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ('cosine', 'mlp', 'positional', 'uniform')


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` in float32, also under autocast: routing decisions should not flip with bf16 noise."""
    if bias is not None:
        bias = bias.float()
    if torch.jit.is_scripting() or not _autocast_available(x.device.type):  # e.g. 'meta': no autocast there
        return F.linear(x.float(), weight.float(), bias)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float(), bias)


@torch.jit.unused
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def expert_anchors(num_experts: int, device: torch.device) -> torch.Tensor:
    """Home positions of the experts for positional routing: a near-square grid of cell centres in [-1, 1]."""
    cols = int(math.ceil(math.sqrt(num_experts)))
    rows = int(math.ceil(num_experts / cols))
    e = torch.arange(num_experts, device=device)
    x = ((e % cols).float() * 2 + 1) / cols - 1
    y = ((e // cols).float() * 2 + 1) / rows - 1
    return torch.stack([x, y], dim=1)


def fill_missing_buffer(module: nn.Module, state_dict: Dict[str, torch.Tensor], prefix: str, name: str) -> None:
    """Give a state dict that predates buffer ``name`` the module's current (default) value, in place.

    For ``_load_from_state_dict`` overrides: checkpoints saved before a buffer was added still load strictly.
    """
    if prefix + name not in state_dict:
        state_dict[prefix + name] = getattr(module, name).detach().clone()


def positional_logits(
        positions: torch.Tensor,
        batch_size: int,
        num_experts: int,
        noise_std: float,
        training: bool,
        anchors: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits that prefer the expert whose anchor is nearest to the patch: -squared distance x 8 (+ noise).

    The scale 8 makes a patch at an anchor choose it with high probability; ``noise_std`` (training only)
    lets patches near a boundary visit the neighbouring experts, which keeps every expert in training.
    ``anchors`` [e, 2] replaces the default grid of :func:`expert_anchors` (e.g. after expert surgery).
    """
    if anchors is None:
        anchors = expert_anchors(num_experts, positions.device)
    logits = -8.0 * (positions.float().unsqueeze(1) - anchors.float().unsqueeze(0)).pow(2).sum(-1)
    logits = logits.unsqueeze(0).expand(batch_size, -1, -1)
    if training and noise_std > 0:
        logits = logits + noise_std * torch.randn_like(logits)
    return logits


def uniform_logits(batch_size: int, num_patches: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """All-but-equal logits. A 1e-4 round-robin tie-break makes top-k spread patches evenly over experts."""
    n = torch.arange(num_patches, device=device).view(-1, 1)
    e = torch.arange(num_experts, device=device).view(1, -1)
    tie_break = ((n - e) % num_experts == 0).float() * 1e-4
    return tie_break.unsqueeze(0).expand(batch_size, -1, -1)


class CosineRouter(nn.Module):
    """Cosine similarity of each patch embedding to E keys, divided by a temperature.

    The keys are a parameter. Three ways to set them, all public:
    :meth:`init_keys` fits them by K-Means to real patch embeddings (before training),
    :meth:`ema_update` moves them towards the embeddings routed to each key (outside the autograd graph),
    or the optimizer learns them (the trainer decides which, per phase).
    """

    def __init__(
            self,
            embed_dim: int,
            num_experts: int,
            temperature: float = 0.1,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'router_temperature must be > 0, got {temperature}')
        self.num_experts = num_experts
        self.temperature = temperature
        self.keys = nn.Parameter(F.normalize(torch.randn(num_experts, embed_dim, device=device, dtype=dtype), dim=1))

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeddings = F.normalize(embeddings.float(), dim=-1)
        keys = F.normalize(self.keys.float(), dim=-1)
        return linear_fp32(embeddings, keys, None) / self.temperature

    @torch.no_grad()
    def init_keys(self, embeddings: torch.Tensor, seed: int = 0, n_init: int = 4) -> torch.Tensor:
        """Fit the keys by spherical K-Means (scikit-learn, on L2-normalised embeddings [m, d]).

        Returns the cluster id of every embedding [m], so callers can check the fit.
        """
        from sklearn.cluster import KMeans

        if embeddings.dim() != 2 or embeddings.shape[1] != self.keys.shape[1]:
            raise ValueError(f'embeddings must be [m, {self.keys.shape[1]}], got {list(embeddings.shape)}')
        if embeddings.shape[0] < self.num_experts:
            raise ValueError(f'need at least num_experts={self.num_experts} embeddings, got {embeddings.shape[0]}')
        points = F.normalize(embeddings.detach().float(), dim=1).cpu().numpy()
        kmeans = KMeans(n_clusters=self.num_experts, n_init=n_init, random_state=seed).fit(points)
        centers = torch.as_tensor(kmeans.cluster_centers_, dtype=torch.float32)
        self.keys.copy_(F.normalize(centers, dim=1).to(self.keys))
        return torch.as_tensor(kmeans.labels_, dtype=torch.long)

    @torch.no_grad()
    def ema_update(self, embeddings: torch.Tensor, expert_indices: torch.Tensor, decay: float = 0.99) -> None:
        """Move each key towards the mean normalised embedding routed to it: [m, d] and [m] top-1 experts.

        Keys that received no embedding stay where they are. No autograd graph is touched.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f'decay must be in [0, 1], got {decay}')
        points = F.normalize(embeddings.detach().float().reshape(-1, self.keys.shape[1]), dim=1)
        one_hot = F.one_hot(expert_indices.reshape(-1), self.num_experts).float()  # [m, e]
        counts = one_hot.sum(0)
        means = F.normalize(one_hot.t() @ points, dim=1)  # direction of the sum = direction of the mean
        updated = F.normalize(decay * self.keys.float() + (1 - decay) * means, dim=1)
        self.keys.copy_(torch.where(counts.unsqueeze(1) > 0, updated, self.keys.float()).to(self.keys))


class MLPRouter(nn.Module):
    """A two-layer MLP on [embedding, patch position] -> E logits."""

    def __init__(
            self,
            embed_dim: int,
            num_experts: int,
            hidden_dim: int = 64,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Linear(embed_dim + 2, hidden_dim, **dd)
        self.fc2 = nn.Linear(hidden_dim, num_experts, **dd)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b = embeddings.shape[0]
        positions = positions.to(embeddings.dtype).unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([embeddings, positions], dim=-1)
        x = F.gelu(linear_fp32(x, self.fc1.weight, self.fc1.bias))
        return linear_fp32(x, self.fc2.weight, self.fc2.bias)


class PositionalRouter(nn.Module):
    """Route by patch position only (see :func:`positional_logits`), with controlled noise while training.

    The experts' home positions are a buffer, ``anchors`` [e, 2] (the :func:`expert_anchors` grid at first), so
    that expert surgery can remove or duplicate experts and keep where the others work; checkpoints saved
    before the buffer existed load with the default grid.
    """

    def __init__(
            self,
            num_experts: int,
            noise_std: float = 1.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std}')
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.register_buffer('anchors', expert_anchors(num_experts, torch.device('cpu')).to(device=device, dtype=dtype))

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positional_logits(positions, embeddings.shape[0], self.num_experts, self.noise_std, self.training,
                                 anchors=self.anchors)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fill_missing_buffer(self, state_dict, prefix, 'anchors')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class UniformRouter(nn.Module):
    """Equal probabilities for every expert (see :func:`uniform_logits`)."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return uniform_logits(embeddings.shape[0], positions.shape[0], self.num_experts, positions.device)


def create_router(
        name: str,
        embed_dim: int,
        num_experts: int,
        temperature: float = 0.1,
        noise_std: float = 1.0,
        hidden_dim: int = 64,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Build a router by name; one of :data:`ROUTERS`. ``device``/``dtype``: timm's factory kwargs."""
    dd = {'device': device, 'dtype': dtype}
    if name == 'cosine':
        return CosineRouter(embed_dim, num_experts, temperature=temperature, **dd)
    if name == 'mlp':
        return MLPRouter(embed_dim, num_experts, hidden_dim=hidden_dim, **dd)
    if name == 'positional':
        return PositionalRouter(num_experts, noise_std=noise_std, **dd)
    if name == 'uniform':
        return UniformRouter(num_experts)
    raise ValueError(f'router must be one of {ROUTERS}, got {name!r}')


def router_needs_embeddings(name: str) -> bool:
    """Whether a router looks at patch content (and so needs the patch embedding module)."""
    return name in ('cosine', 'mlp')
