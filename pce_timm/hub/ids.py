"""Where pce_timm's pretrained weights live on the Hugging Face Hub: one organisation for every model.

The lowest module of the package: it imports nothing, so the models (``default_cfgs`` use ``hub_id``) and the
hub code (the missing-weights message names ``PCE_HUB_ORG``) both import it and not each other.
"""
from typing import Optional, Tuple

__all__ = ['PCE_HUB_ORG', 'hub_id', 'split_revision']

PCE_HUB_ORG = 'pce-timm'


def hub_id(model_name_tag: str) -> str:
    """Full Hub repository id of a pretrained model, e.g. ``hub_id('pce_resnet18.fmnist')``.

    Use it as ``hf_hub_id`` in a ``default_cfgs`` entry only for a tag whose release exists (``make release``
    builds it and installs it into the local HF cache; ``scripts/push_to_hub.py`` uploads it): timm treats any
    entry with an ``hf_hub_id`` as pretrained (``timm.list_pretrained``) and will try to download it. Where
    neither the cache nor the Hub has it, ``create_model(..., pretrained=True)`` raises a MissingWeightsError
    that says how to get it.
    """
    if '.' not in model_name_tag:
        raise ValueError(f"model_name_tag must be 'architecture.tag', got {model_name_tag!r}")
    return f'{PCE_HUB_ORG}/{model_name_tag}'


def split_revision(hf_hub_id: str) -> Tuple[str, Optional[str]]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``; no ``@`` -> ``(hf_hub_id, None)``, as timm reads the id.

    Raises:
        ValueError: more than one ``@``.
    """
    repo_id, *revision = hf_hub_id.split('@')
    if len(revision) > 1:
        raise ValueError(f'hf_hub_id {hf_hub_id!r}: at most one "@" (before the revision) is accepted.')
    return repo_id, (revision[0] if revision else None)
