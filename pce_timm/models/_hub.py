"""Where pce_timm's pretrained weights live on the Hugging Face Hub: one organisation for every model."""

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
