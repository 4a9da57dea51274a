#!/usr/bin/env python
"""Where does each expert work, on what, and how balanced is it? Writes stats.json, figures and report.md.

    python scripts/analyze_routing.py --model runs/demo/pce_resnet18 --dataset fashion_mnist \\
        --output-dir runs/demo/analysis --num-images 1000

--model takes a training run folder, a model folder (config.json + model.safetensors), a checkpoint folder,
local-dir:DIR, hf-hub:ID or a registered name with pretrained weights. For a run folder (or its model/
folder) the run's routing_history (results.json) is plotted over the epochs too.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', required=True, help='run / model / checkpoint folder, local-dir:, hf-hub:, name')
    parser.add_argument('--dataset', required=True, help='dataset name (see pce_timm.data.list_datasets())')
    parser.add_argument('--data-dir', default=None, help='local dataset folder (IDX, parquet or class folders)')
    parser.add_argument('--split', default='test')
    parser.add_argument('--output-dir', required=True)
    parser.add_argument('--num-images', type=int, default=512, help='images to route (default 512)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--sample-images', type=int, default=6, help='images in the assignment-map figures')
    parser.add_argument('--num-clusters', type=int, default=None, help='route clusters (default: num classes)')
    parser.add_argument('--seed', type=int, default=0, help='which images are picked (seeded subset)')
    parser.add_argument('--device', default=None)  # None: cuda when available, else cpu
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    for name in ('num_images', 'batch_size', 'sample_images', 'num_clusters'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {value}')
    return args


def routing_history(model_source: str) -> Optional[List[Dict[str, Any]]]:
    """The ``routing_history`` of the training run ``model_source`` belongs to, or None.

    Found for a run folder (``<run>/results.json``), its exported model folder (``<run>/model``, as named by
    results.json's ``model_dir``) and its checkpoint folders (``<run>/checkpoints/<name>``).
    """
    from pce_timm.train.trainer import RESULTS_FILE

    path = Path(model_source.removeprefix('local-dir:'))
    if not path.is_dir():
        return None
    results = None
    if (path / RESULTS_FILE).is_file():
        results = json.loads((path / RESULTS_FILE).read_text())
    elif (path.parent / RESULTS_FILE).is_file():
        run_results = json.loads((path.parent / RESULTS_FILE).read_text())
        results = run_results if run_results.get('model_dir') == path.name else None
    elif path.parent.name == 'checkpoints' and (path.parent.parent / RESULTS_FILE).is_file():
        results = json.loads((path.parent.parent / RESULTS_FILE).read_text())
    return (results or {}).get('routing_history') or None


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from pce_timm.analysis.analyze import analyze_model
    from pce_timm.data import create_dataset_transform, create_loader, dataset_info, load_image_dataset
    from pce_timm.train.models import load_model

    info = dataset_info(args.dataset)
    dataset = load_image_dataset(args.dataset, args.split, args.data_dir)  # fails early, saying where it looked
    model = load_model(args.model).to(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if model.num_classes != info['num_classes']:
        raise ValueError(f'--model {args.model} predicts {model.num_classes} classes but --dataset '
                         f'{info["name"]} has {info["num_classes"]}')
    loader = create_loader(dataset, create_dataset_transform(model, is_training=False),
                           batch_size=args.batch_size, max_samples=args.num_images, seed=args.seed)
    report = analyze_model(
        model, loader, args.output_dir, num_images=args.num_images, num_classes=info['num_classes'],
        class_names=info.get('class_names'), num_clusters=args.num_clusters, sample_images=args.sample_images,
        history=routing_history(args.model), progress=not args.no_progress,
        meta={'model': args.model, 'dataset': info['name'], 'split': args.split, 'seed': args.seed})
    print(f'wrote {report} (+ stats.json and figures/ beside it)')


if __name__ == '__main__':
    parse_args()  # --help and bad flags answer here, before torch is imported
    from pce_timm.train.cli import run_cli

    sys.exit(run_cli(main))
