#!/usr/bin/env python
"""Expert surgery on a trained PCE-ResNet: prune rarely used experts, duplicate the busiest ones.

    # drop every expert with less than 5% of a layer's top-1 choices (usage counted on the train split)
    python scripts/surgery.py --model runs/demo --dataset fashion_mnist --output-dir runs/demo-pruned \\
        --prune-below 0.05
    # duplicate the busiest expert of two layers, copies nudged apart
    python scripts/surgery.py --model runs/demo --dataset fashion_mnist --output-dir runs/demo-plus \\
        --reinforce layer3.0.conv1 layer3.1.conv1 --noise-std 0.01
    # explicit experts to keep; usage from an earlier scripts/analyze_routing.py run
    python scripts/surgery.py --model runs/demo --dataset fashion_mnist --output-dir runs/demo-keep \\
        --keep layer3.0.conv1=0,2,3 --stats runs/demo/analysis/stats.json

--noise-std 0 (the default) keeps the output of soft and top-1 layers exactly; under top-1 routing the two
copies then tie and the copy gets no patches until they differ, so give top-1 models a small --noise-std.

--model takes what scripts/analyze_routing.py takes. Usage (top-1 choices per expert) is counted on
--usage-split (default train; routing only, no labels), or read from --stats. Pruning runs before
reinforcement; --reinforce with no layer names reinforces every PCE layer. Top-1 accuracy before and after is
measured on the same --num-images images of --split, and printed with parameter counts and experts per layer.

The new model folder (config.json + model.safetensors, loadable with timm.create_model('local-dir:DIR',
pretrained=True)) is written to a temporary folder and renamed into place; an existing folder is only
replaced with --overwrite. See pce_timm.analysis.surgery for what each operation keeps exact.
"""
from __future__ import annotations  # torch only in the hints: --help imports no torch

import argparse
import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

if TYPE_CHECKING:
    import torch


def keep_spec(text: str) -> Tuple[str, List[int]]:
    """``LAYER=ID,ID,...`` -> (layer, [ids])."""
    name, sep, ids = text.partition('=')
    try:
        experts = [int(i) for i in ids.split(',')]
    except ValueError:
        experts = []
    if not sep or not name or not experts:
        raise argparse.ArgumentTypeError(f'expected LAYER=ID,ID,... (e.g. layer3.0.conv1=0,2), got {text!r}')
    return name, experts


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='run / model / checkpoint folder, local-dir:, hf-hub:, name')
    parser.add_argument('--dataset', required=True, help='dataset name (see pce_timm.data.list_datasets())')
    parser.add_argument('--data-dir', default=None, help='local dataset folder (IDX, parquet or class folders)')
    parser.add_argument('--split', default='test', help='split the accuracy before / after is measured on')
    parser.add_argument('--usage-split', default='train', help='split expert usage is counted on')
    parser.add_argument('--stats', default=None, help='take usage from this stats.json instead of counting it')
    parser.add_argument('--output-dir', required=True, help='the new model folder')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --output-dir')
    parser.add_argument('--prune-below', type=float, default=None, metavar='SHARE',
                        help='remove experts with a smaller share of their layer\'s top-1 choices (0..1)')
    parser.add_argument('--keep', type=keep_spec, action='append', default=None, metavar='LAYER=ID,ID',
                        help='keep only these experts of LAYER (repeatable)')
    parser.add_argument('--reinforce', nargs='*', default=None, metavar='LAYER',
                        help='duplicate the busiest expert of these layers (no names: every PCE layer)')
    parser.add_argument('--noise-std', type=float, default=0.0, help='moves a duplicate and its original apart')
    parser.add_argument('--seed', type=int, default=0, help='image subsets and the noise')
    parser.add_argument('--num-images', type=int, default=1000, help='images for usage and for accuracy')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--device', default=None)  # None: cuda when available, else cpu
    args = parser.parse_args(argv)
    if args.prune_below is None and args.keep is None and args.reinforce is None:
        parser.error('nothing to do: pass --prune-below, --keep and/or --reinforce')
    if args.prune_below is not None and args.keep is not None:
        parser.error('--prune-below and --keep both choose the experts to keep; pass one of them')
    if args.prune_below is not None and not 0.0 <= args.prune_below <= 1.0:
        parser.error(f'--prune-below must be a usage share in [0, 1], got {args.prune_below}')
    if args.noise_std < 0:
        parser.error(f'--noise-std must be >= 0, got {args.noise_std}')
    for name in ('num_images', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if Path(args.output_dir).exists() and not args.overwrite:
        parser.error(f'--output-dir {args.output_dir} exists; pass --overwrite to replace it')
    return args


def _loader(args: argparse.Namespace, model: torch.nn.Module, split: str):
    from pce_timm.data import create_dataset_transform, create_loader, load_image_dataset

    dataset = load_image_dataset(args.dataset, split, args.data_dir)
    return create_loader(dataset, create_dataset_transform(model, is_training=False), batch_size=args.batch_size,
                         max_samples=args.num_images, seed=args.seed)


def _usage(args: argparse.Namespace, model: torch.nn.Module) -> Dict[str, List[int]]:
    from pce_timm.analysis.surgery import collect_usage, usage_from_stats

    if args.stats:
        return usage_from_stats(args.stats)
    counts = collect_usage(model, _loader(args, model, args.usage_split), args.num_images)
    return {name: c.tolist() for name, c in counts.items()}


def operate(model: torch.nn.Module, args: argparse.Namespace, usage: Dict[str, List[int]]) -> None:
    """Prune, then reinforce ``model`` in place as ``args`` say; usage follows the pruned experts."""
    from pce_timm.analysis.surgery import prune_experts, reinforce_experts

    if args.keep is not None or args.prune_below is not None:
        kept = (prune_experts(model, keep=dict(args.keep)) if args.keep is not None else
                prune_experts(model, min_usage=args.prune_below, usage=usage))
        usage = {name: [counts[i] for i in kept[name]] if name in kept else counts for name, counts in usage.items()}
    if args.reinforce is not None:
        reinforce_experts(model, args.reinforce or 'all', usage=usage, noise_std=args.noise_std, seed=args.seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from pce_timm.analysis.surgery import SurgeryError, check_surgery, evaluate_surgery, format_surgery_table
    from pce_timm.data import dataset_info
    from pce_timm.train.checkpoint import save_model_dir
    from pce_timm.train.models import load_model

    info = dataset_info(args.dataset)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = load_model(args.model).to(device).eval()
    if model.num_classes != info['num_classes']:
        raise SurgeryError(f'--model {args.model} predicts {model.num_classes} classes but --dataset '
                           f'{info["name"]} has {info["num_classes"]}; pass the dataset the model was trained on')
    check_surgery(model, keep=args.keep, reinforce=args.reinforce)  # before any image is read
    eval_loader = _loader(args, model, args.split)  # a missing split fails here, before any work
    changed = copy.deepcopy(model)  # the original stays as loaded, for the 'before' column
    operate(changed, args, _usage(args, model))
    result = evaluate_surgery(model, changed, eval_loader, args.num_images)
    print(format_surgery_table(result))
    path = save_model_dir(changed, args.output_dir, label_names=model.pretrained_cfg.get('label_names'))
    print(f'\nwrote {path} (load with timm.create_model("local-dir:{path}", pretrained=True))')


if __name__ == '__main__':
    parse_args()  # --help and bad flags answer here, before torch is imported
    from pce_timm.analysis.surgery import SurgeryError
    from pce_timm.train.cli import run_cli

    sys.exit(run_cli(main, extra_errors=(((SurgeryError,), 2),)))
