"""Model-agnostic PCE building blocks. Registers no models."""
from .attention import DeformableAttention2d
from .dispatch import (
    ExpertChoice,
    ExpertChoiceDispatch,
    Routing,
    SlotDispatch,
    SoftDispatch,
    SortedDispatch,
    assign_slots,
    expert_capacity,
    expert_choice,
    expert_choice_capacity,
    route,
)
from .embed import PatchEmbedSPP
from .experts import ConvExperts
from .find import pce_layers
from .losses import AuxLossWeights, collect_aux_loss, load_balance_loss, router_entropy_loss, router_z_loss
from .patches import (
    PatchGeometry,
    coord_channels,
    grid_size,
    patch_geometry,
    patch_positions,
    patchify,
    unpatchify,
    window_index,
)
from .pce import BALANCES, BIAS_UPDATES, CHOICES, ROUTING_MODES, PCEConv2d
from .routers import ROUTERS, CosineRouter, MLPRouter, PositionalRouter, UniformRouter, create_router
