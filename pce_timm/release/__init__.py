"""pce_timm's own releases: card data, card rendering, the ``make release`` pipeline and its offline check.

    cards.py     model_cards/<family>.yaml -> checked dataclasses; measured numbers written back
    render.py    Hub model cards and the README model table from the card data (CLI: model_cards/render.py)
    pipeline.py  train -> measure -> card YAML -> release folder -> HF cache -> offline check (make release)
    verify.py    the offline check, run in a fresh interpreter: python -m pce_timm.release.verify (so the
                 package does not import it)

Arrows point down: release -> train / analysis -> models -> hub -> utils. :mod:`pce_timm.hub` is the generic
part (release folders, HF cache, push) for any timm model; this package is what is specific to pce_timm's zoo
and its repository (recipes, model_cards/, README). The CLIs are scripts/make_release.py and
scripts/push_to_hub.py.
"""
from .cards import CardDataError, CardNumbers, Measured, ModelEntry, default_card_files, find_entry, load_entries
from .pipeline import RELEASES, ReleaseCheckFailed, ReleaseConfig, ReleaseRefused, ReleaseSpec, make_release
from .render import card_assets, minimal_card, render_baseline_card, render_hub_card, render_model_table

__all__ = [
    'RELEASES', 'CardDataError', 'CardNumbers', 'Measured', 'ModelEntry', 'ReleaseCheckFailed', 'ReleaseConfig',
    'ReleaseRefused', 'ReleaseSpec', 'card_assets', 'default_card_files', 'find_entry', 'load_entries',
    'make_release', 'minimal_card', 'render_baseline_card', 'render_hub_card', 'render_model_table',
]
