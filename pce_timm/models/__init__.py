"""The pce_* model families; importing this module registers them with timm."""
from ._hub import PCE_HUB_ORG, hub_id
from .pce_resnet import (
    PCEBasicBlock,
    PCEBottleneck,
    PCEResNet,
    checkpoint_filter_fn,
    pce_arch_args,
    upcycle_dense_state_dict,
)
from .pce_vit_hybrid import PCEHybridEmbed, PCEVisionTransformer
