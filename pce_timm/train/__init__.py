"""Training: the phase schedule, loop pieces and checkpoint helpers behind ``scripts/train.py`` and friends.

    from pce_timm.train import parse_args, train
    results = train(parse_args(['--config', 'scripts/configs/demo_fmnist.yaml', '--epochs', '1']))
"""
from .checkpoint import NonFiniteLossError, TrainerState, latest_checkpoint, resolve_resume, save_model_dir
from .config import RecipeError, build_parser, load_recipe, parse_args, save_config, validate_args
from .optim import GROUPS, param_groups
from .router_keys import init_router_keys
from .schedule import KEYS, ROUTING, Phase, apply_phase, parse_phases
from .trackers import CSVTracker
from .trainer import RESULTS_FILE, train
