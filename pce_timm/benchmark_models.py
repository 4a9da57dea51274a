"""Model section of ``scripts/benchmark.py``: PCE models next to dense timm models, measured in one run.

Each PCE model is compared with its dense counterpart, timed in the same interleaved rounds:

- ``pce_resnet{18,34,50}[_e8]`` -> timm's ``resnet{18,34,50}`` (the same widths and depths); ``pce_resnet18_e8
  (expert choice)`` is that model built with ``choice='expert'`` (each expert picks its patches of every image);
- ``pce_vit_hybrid_*`` -> the same hybrid built with ``pce_stages=()`` (its backbone all dense convs);
- timm's CondConv mixture of experts ``efficientnet_cc_b0_4e`` -> ``efficientnet_b0``, as a reference point
  for what another conv-MoE costs over its dense model;
- ``NAME (channels_last)``: the model in channels-last memory (``model.to(memory_format=torch.channels_last)``,
  each batch converted as timm's ``train.py --channels-last`` does, the conversion timed), compared with the
  same baseline as NAME (in NCHW): ``resnet18 (channels_last)`` -> ``resnet18``.

The grid section (:func:`grid_cases`) times ``pce_resnet18`` / ``pce_resnet18_e8`` built with several routing
grids (:data:`GRID_SETTINGS`: the earlier pixel default, the default ``patch_grid`` and finer grids) next to one
``resnet18``, all in one worker process, and reads the zoo's speed goals for each grid (:func:`grid_goals`).

Throughput is images per second (batch / median time), forward in eval mode without gradients and one
training step (forward + backward) in train mode. MACs are counted with ``torch.utils.flop_counter`` (convs,
matmuls: the ops that cost; gathers and element-wise ops are not counted) per image of the timed batch, in
eval mode.
"""
import warnings
from typing import Dict, List

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import pce_timm  # noqa: F401  (registers the pce_* models)

from .benchmark import Case, Timing

__all__ = ['DEFAULT_MODELS', 'GRID_MODELS', 'GRID_SETTINGS', 'baseline_of', 'count_gmacs', 'model_cases',
           'model_goals', 'model_rows', 'format_model_table', 'grid_cases', 'grid_goals', 'format_grid_table']

DEFAULT_MODELS = (
    'pce_resnet18', 'pce_resnet18_e8', 'pce_resnet18_e8 (expert choice)', 'pce_resnet34', 'pce_resnet34_e8',
    'pce_resnet50', 'pce_resnet50_e8',
    'pce_vit_hybrid_small_r18', 'efficientnet_cc_b0_4e',
)
GRID_MODELS = ('pce_resnet18', 'pce_resnet18_e8')
# label -> the model kwargs of a routing grid (pce_resnet18's PCE stages are 2 and 3, ``layer3`` / ``layer4``)
GRID_SETTINGS = (
    ('patch_size (8, 4, 7, 7) px, the old default', dict(patch_size=(8, 4, 7, 7))),
    ('patch_grid (7, 7, 2, 2), the default', dict(patch_grid=(7, 7, 2, 2))),
    ('patch_grid (7, 7, 4, 4)', dict(patch_grid=(7, 7, 4, 4))),
    ('patch_grid (7, 7, 7, 7)', dict(patch_grid=(7, 7, 7, 7))),
)
DENSE_TWIN = 'dense twin'  # a PCE model rebuilt with pce_stages=()
EXPERT_CHOICE = 'expert choice'  # a PCE model rebuilt with choice='expert'
CHANNELS_LAST = 'channels_last'  # any model, in channels-last memory


class _ChannelsLast(nn.Module):
    """A model in channels-last memory that converts its input batch too (timm train.py's --channels-last)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def baseline_of(name: str) -> str:
    """The dense model ``name`` is compared with (see the module docstring)."""
    if name.endswith(f' ({CHANNELS_LAST})'):
        plain = name.split(' ')[0]
        return plain if not plain.startswith(('pce_', 'efficientnet_cc_b0')) else baseline_of(plain)
    if name.startswith('pce_resnet'):
        return name[len('pce_'):].split('_')[0]
    if name.startswith('pce_'):
        return f'{name} ({DENSE_TWIN})'
    if name.startswith('efficientnet_cc_b0'):
        return 'efficientnet_b0'
    raise ValueError(f'no dense baseline known for {name!r}; accepted: pce_* models and efficientnet_cc_b0_*')


def _create(name: str) -> nn.Module:
    if name.endswith(f' ({CHANNELS_LAST})'):
        return _ChannelsLast(_create(name[:-len(f' ({CHANNELS_LAST})')]))
    if name.endswith(f' ({DENSE_TWIN})'):
        return timm.create_model(name.split(' ')[0], pce_stages=())
    if name.endswith(f' ({EXPERT_CHOICE})'):
        return timm.create_model(name.split(' ')[0], choice='expert')
    return timm.create_model(name)


def count_gmacs(model: nn.Module, input_size: int, in_chans: int = 3, batch_size: int = 1) -> float:
    """Multiply-accumulates (in billions) per image of one eval forward of ``batch_size`` images.

    Counted at the batch that is timed. In eval a sparse PCE layer runs each expert on exactly its own
    patches, so MACs per image do not depend on the batch; a compiled graph or ``eval_capacity_factor``
    would use per-expert slots, whose count (and empty slots) does.
    """
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(batch_size, in_chans, input_size, input_size))
    return counter.get_total_flops() / 2e9 / batch_size


def model_cases(names: List[str], input_size: int = 224, batch_size: int = 32) -> List[Case]:
    """One case per model and per distinct baseline, each baseline right before the models that use it.

    Each case builds its model once: timing, parameter count and MACs (in ``info``) all measure that one
    instance. A model's reference (``Case.ref``) is its dense baseline; a baseline's is itself.
    """
    cases, seen = [], set()
    for name in names:
        base = baseline_of(name)
        for case_name, role in ((base, 'dense'), (name, 'pce' if name.startswith('pce_') else 'moe')):
            if case_name in seen:
                continue
            seen.add(case_name)
            try:
                model = _create(case_name)
            except TypeError:
                if case_name.endswith(f' ({EXPERT_CHOICE})'):
                    continue  # an --old-rev tree from before expert choice
                raise
            info = {'role': role, 'baseline': None if role == 'dense' else base,
                    'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
                    'gmacs': count_gmacs(model, input_size, batch_size=batch_size)}
            cases.append(Case(case_name, lambda m=model: m, info, {base if role != 'dense' else case_name: 1.0}))
    return cases


def model_rows(timings: List[Timing], batch_size: int) -> List[Dict[str, object]]:
    """Throughput rows (images per second, and x = throughput / the baseline's) from timed model cases."""
    return [{
        'model': t.name, 'baseline': t.info['baseline'], 'params_m': t.info['params_m'], 'gmacs': t.info['gmacs'],
        'infer_img_s': batch_size * 1e3 / t.forward_ms, 'train_img_s': batch_size * 1e3 / t.train_ms,
        'infer_x': 1 / t.forward_ratio, 'train_x': 1 / t.train_ratio,
    } for t in timings]


def model_goals(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Issue 12's throughput goals for pce_resnet18_e8 (E=8, top-1) against resnet18."""
    by_name = {row['model']: row for row in rows}
    row = by_name.get('pce_resnet18_e8')
    goals = []
    for label, key, limit in (('pce_resnet18_e8 train throughput / resnet18', 'train_x', 0.9),
                              ('pce_resnet18_e8 inference throughput / resnet18', 'infer_x', 0.95)):
        value = row[key] if row else float('nan')
        goals.append({'goal': label, 'value': round(value, 3), 'limit': limit, 'ok': bool(row) and value >= limit})
    return goals


def format_model_table(rows: List[Dict[str, object]], processes: List[str] = ()) -> str:
    """Markdown table of :func:`model_rows`; ``processes`` (one label per row) adds a ``process`` column."""
    header = ['model'] + (['process'] if processes else []) + [
        'vs', 'params (M)', 'GMACs', 'infer img/s', 'infer x', 'train img/s', 'train x']
    table = []
    for i, r in enumerate(rows):
        ratio = (lambda v: f'{v:.2f}') if r['baseline'] else (lambda v: '')
        table.append([r['model']] + ([processes[i]] if processes else []) + [
            r['baseline'] or '-', f"{r['params_m']:.2f}", f"{r['gmacs']:.2f}",
            f"{r['infer_img_s']:.1f}", ratio(r['infer_x']), f"{r['train_img_s']:.1f}", ratio(r['train_x'])])
    from .utils import markdown_table  # parent side only (see pce_timm.benchmark's docstring)
    return markdown_table(header, table)


def routing_grids(model: nn.Module, input_size: int, in_chans: int = 3) -> str:
    """Each PCE stage's patch grid and output patch in px for one ``input_size`` image, e.g. ``'layer3 2x2 (7
    px), layer4 2x2 (4 px)'`` (the grid of a stage's stride-1 layers; the first block's covers the same regions)."""
    from pce_timm.layers import PCEConv2d

    maps: Dict[str, tuple] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input passes unchanged
            maps.setdefault(name, tuple(args[0].shape[2:]))
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, PCEConv2d)]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # a 1x1 grid warns; the table says so itself
            model(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    stages: Dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, PCEConv2d) and module.stride == 1 and name in maps:
            h, w = (int(v) for v in maps[name])
            patch = module.patch_size_for(h, w) if hasattr(module, 'patch_size_for') else module.patch_size
            gh, gw = (h + patch[0] - 1) // patch[0], (w + patch[1] - 1) // patch[1]
            stages.setdefault(name.split('.')[0], f'{gh}x{gw} ({patch[0]} px)')
    return ', '.join(f'{stage} {grid}' for stage, grid in stages.items())


def grid_cases(models: List[str] = GRID_MODELS, input_size: int = 224, batch_size: int = 32,
               settings=GRID_SETTINGS) -> List[Case]:
    """``resnet18``, then every model of ``models`` with every routing grid of ``settings`` ((label, model kwargs)
    pairs, default :data:`GRID_SETTINGS`), each
    divided by that resnet18 (one worker: the same process, the same rounds). A setting an older tree cannot
    build (no ``patch_grid`` before it existed) is left out."""
    base = 'resnet18'
    dense = timm.create_model(base)
    cases = [Case(base, lambda m=dense: m, {'role': 'dense', 'baseline': None, 'grids': '',
                                            'params_m': sum(p.numel() for p in dense.parameters()) / 1e6,
                                            'gmacs': count_gmacs(dense, input_size, batch_size=batch_size)},
                  {base: 1.0})]
    for name in models:
        if baseline_of(name) != base:
            raise ValueError(f'the grid section compares PCE-ResNet-18s with resnet18, got {name!r}')
        for label, kwargs in settings:
            try:
                model = timm.create_model(name, **kwargs)
            except TypeError:
                continue  # an --old-rev tree from before patch_grid
            info = {'role': 'pce', 'baseline': base, 'routing': label, 'grids': routing_grids(model, input_size),
                    'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
                    'gmacs': count_gmacs(model, input_size, batch_size=batch_size)}
            cases.append(Case(f'{name}, {label}', lambda m=model: m, info, {base: 1.0}))
    return cases


def grid_goals(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Issue 12's goals for ``pce_resnet18_e8`` (train >= 0.9x, inference >= 0.95x resnet18) at every grid."""
    goals = []
    for row in rows:
        if not str(row['model']).startswith('pce_resnet18_e8, '):
            continue
        train_ok, infer_ok = row['train_x'] >= 0.9, row['infer_x'] >= 0.95
        goals.append({'routing': row['model'].split(', ', 1)[1], 'train_x': round(row['train_x'], 3),
                      'infer_x': round(row['infer_x'], 3), 'train_ok': bool(train_ok), 'infer_ok': bool(infer_ok),
                      'ok': bool(train_ok and infer_ok)})
    return goals


def format_grid_table(rows: List[Dict[str, object]], grids: Dict[str, str]) -> str:
    """Markdown table of the grid section's :func:`model_rows`, with each case's grids (``grids``: name -> text)."""
    header = ['model', 'routing', 'PCE grids at this size (output patch)', 'params (M)', 'GMACs', 'infer img/s',
              'infer x', 'train img/s', 'train x']
    table = []
    for r in rows:
        model, _, routing = str(r['model']).partition(', ')
        ratio = (lambda v: f'{v:.2f}') if r['baseline'] else (lambda v: '')
        table.append([model, routing or '-', grids.get(r['model'], '') or '-', f"{r['params_m']:.2f}",
                      f"{r['gmacs']:.2f}", f"{r['infer_img_s']:.1f}", ratio(r['infer_x']), f"{r['train_img_s']:.1f}",
                      ratio(r['train_x'])])
    from .utils import markdown_table  # parent side only (see pce_timm.benchmark's docstring)
    return markdown_table(header, table)
