"""The Hub ids of the models' ``default_cfgs``; defined in :mod:`pce_timm.hub.ids` (models import hub, never back)."""
from pce_timm.hub.ids import PCE_HUB_ORG, hub_id

__all__ = ['PCE_HUB_ORG', 'hub_id']
