"""Training behind ``scripts/train.py`` and friends, read top-down:

    from pce_timm.train import parse_args, train
    results = train(parse_args(['--config', 'scripts/configs/demo_fmnist.yaml', '--epochs', '1']))

- :mod:`.config`: argv + YAML recipe -> a typed :class:`TrainConfig` (one frozen section per concept);
- :mod:`.trainer`: ``train(cfg)`` sets a run up from the sections and runs its epochs;
- :mod:`.data` (datasets, loaders), :mod:`.models` (model sources, freezing), :mod:`.optim` (parameter groups,
  optimizer, lr schedule), :mod:`.router_keys` (K-Means / EMA keys), :mod:`.schedule` (phases);
- :mod:`.engine`: the loop (phase switches, loss, one epoch, evaluation); :mod:`.metrics`: what it measures;
- :mod:`.checkpoint`, :mod:`.trackers`, :mod:`.evaluation` (``scripts/evaluate.py``), :mod:`.cli`.
"""
from .checkpoint import NonFiniteLossError, TrainerState, latest_checkpoint, resolve_resume, save_model_dir
from .config import RecipeError, TrainConfig, build_parser, load_recipe, parse_args, save_config, validate_args
from .optim import param_groups
from .router_keys import init_router_keys
from .schedule import GROUPS, KEYS, ROUTING, Phase, apply_phase, parse_phases
from .trackers import CSVTracker
from .trainer import RESULTS_FILE, train
