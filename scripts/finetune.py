#!/usr/bin/env python
"""Fine-tune trained weights on a (new) dataset: scripts/train.py with fine-tuning defaults.

    python scripts/finetune.py --model pce_resnet18.fmnist --dataset mnist --epochs 2      # pretrained tag
    python scripts/finetune.py --model runs/demo/pce_resnet18 --dataset digits --freeze experts
    python scripts/finetune.py --model local-dir:runs/x/model --dataset cifar10 --freeze backbone --lr 1e-3
    python scripts/finetune.py --model runs/x/checkpoints/checkpoint_3 --dataset digits

--model is the starting point: a timm name with pretrained weights, local-dir:DIR / hf-hub:ID, a run folder,
a model folder or an accelerate checkpoint folder. A dataset with another number of classes gets a new
classifier (timm drops the old one). --freeze experts|router|backbone keeps those parameters (and their
BatchNorm statistics) unchanged. Defaults differ from train.py: lr 1e-4, 3 epochs, no warmup, no K-Means key
init (the keys are trained), run folder runs/finetune-<source>-<dataset>. Every train.py option applies.
"""
import sys
from pathlib import Path

FINETUNE_DEFAULTS = dict(lr=1e-4, epochs=3, key_init='none', warmup_epochs=0)


def finetune_parser(build_parser):
    """train.py's parser (from ``build_parser``) with this script's description and defaults."""
    parser = build_parser()
    parser.description = __doc__.split('\n')[1]
    parser.set_defaults(**FINETUNE_DEFAULTS)
    return parser


def main(argv=None) -> int:
    from pce_timm.train.cli import run_cli
    from pce_timm.train.config import build_parser, parse_args
    from pce_timm.train.models import resolve_model_source, source_name
    from pce_timm.train.trainer import train

    def run():
        parser = finetune_parser(build_parser)
        pre, _ = parser.parse_known_args(argv)
        if pre.model and not pre.output_dir and not pre.resume and pre.dataset:
            parser.set_defaults(output_dir=str(Path('runs') / f'finetune-{source_name(pre.model)}-{pre.dataset}'))
        cfg = parse_args(argv, parser)
        name, checkpoint = resolve_model_source(cfg.model.name)
        if checkpoint is None and name == cfg.model.name and ':' not in name:
            cfg = cfg.replace(pretrained=True)  # a timm name: start from its pretrained weights
        train(cfg)

    return run_cli(run)


if __name__ == '__main__':
    from _fast_help import flags_module, wants_help

    if wants_help():  # print the flags without importing torch (scripts/_fast_help.py)
        finetune_parser(flags_module().build_parser).parse_args()
    sys.exit(main())
