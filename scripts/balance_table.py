#!/usr/bin/env python
"""The balanced-routing table (docs/results/balance_fmnist.md) from the runs of scripts/configs/balance_fmnist.yaml.

    python scripts/balance_table.py runs/balance            # reads runs/balance/e{4,8,16}_{loss,bias,expert}

Each run folder's results.json gives, per PCE layer, the eval imbalance (busiest / least used expert: top-1
choices for token choice, processed patches for expert choice) and, for expert choice, the dropped fraction
(patches no expert picked), plus the final test top-1. Prints a markdown table.
"""
import argparse
import json
import sys
from pathlib import Path

DISCIPLINES = (
    ('loss', 'token top-1 + load-balance loss'),
    ('bias', 'token top-1 + loss-free bias'),
    ('expert', 'expert choice (k=1)'),
)


def _num(value, fmt: str) -> str:
    return '-' if value is None else format(value, fmt)


def table(root: Path, experts=(4, 8, 16)) -> str:
    rows, layer_names = [], None
    for e in experts:
        for key, label in DISCIPLINES:
            path = root / f'e{e}_{key}' / 'results.json'
            if not path.is_file():  # a run that did not finish: its row says so
                rows.append([str(e), label, f'no {path.parent.name}/results.json', '-', '-', '-'])
                continue
            results = json.loads(path.read_text())
            routing = results['routing']
            layer_names = layer_names or list(routing)
            imbalances = [routing[name]['imbalance'] for name in layer_names]
            finite = [i for i in imbalances if i is not None]
            worst = None if len(finite) < len(imbalances) else max(finite)
            dropped = [routing[name]['dropped_fraction'] for name in layer_names if 'dropped_fraction' in routing[name]]
            rows.append([str(e), label, ' / '.join(_num(i, '.2f') if i is not None else 'inf' for i in imbalances),
                         _num(worst, '.2f') if imbalances else '-',
                         _num(max(dropped), '.3f') if dropped else '-', _num(results['top1'], '.2f')])
    if layer_names is None:
        raise FileNotFoundError(f'no e{{E}}_{{loss,bias,expert}}/results.json under {root}')
    layers = ' / '.join(name.replace('.conv1', '') for name in layer_names)
    header = ['E', 'discipline', f'eval imbalance per PCE layer ({layers})', 'max', 'dropped fraction (max)',
              'test top-1 (%)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * len(header)) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', type=Path, help='folder holding the run folders e{E}_{loss,bias,expert}')
    parser.add_argument('--experts', type=int, nargs='+', default=[4, 8, 16])
    args = parser.parse_args(argv)
    try:
        print(table(args.root, tuple(args.experts)))
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
