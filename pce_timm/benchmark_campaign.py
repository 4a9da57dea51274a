"""Campaign section of ``scripts/benchmark.py``: a training step of the models of a sweep's cells (the
Fashion-MNIST campaign's by default) next to its dense cell, timed in the same interleaved rounds as the other
sections.

A cell's train time in a sweep summary is the whole run (every phase, the per-epoch evaluation, K-Means key
init) measured in its own process, good to about +-15% on a shared machine. This section times what most of
that run repeats, the step of the last phase, for every cell in one process, interleaved, so machine noise hits
every cell alike: it tells whether a run ratio such as the winners' 1.27x comes from the model or the noise.
Each model is the one the cell's recipe builds (the sweep's recipe, its options, the cell's options:
:func:`pce_timm.sweep.run_recipe`), switched to its recipe's last phase, fed a random batch of the recipe's
batch size at the dataset's image size. MACs are per image of one eval forward. The step is forward + backward
(no optimizer step or auxiliary losses, as in every section).
"""
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml

from .benchmark import Case
from .benchmark_models import count_gmacs

__all__ = ['DEFAULT_CELLS', 'DEFAULT_SWEEP', 'campaign_cases', 'cell_model']

DEFAULT_SWEEP = Path(__file__).resolve().parents[1] / 'scripts' / 'configs' / 'sweeps' / 'fmnist_factors.yaml'
DEFAULT_CELLS = ('dense', 'pce base', 'winners: soft + B + no attention', 'winners: top-2 + B + no attention',
                 'control: dense widened to the MACs', 'control: dense widened to the params')


def cell_model(sweep: Path, name: str) -> Tuple[nn.Module, Tuple[int, int, int, int]]:
    """The model of sweep cell ``name`` (seed 0) in its last phase, and the input shape of its training batches.

    Raises:
        ValueError: No cell of that name, or a cell that starts from another cell's runs (it has no model of its
            own to build before that run exists).
    """
    from pce_timm.data import dataset_info
    from pce_timm.sweep import load_sweep_config, run_recipe
    from pce_timm.train.config import TrainConfig
    from pce_timm.train.models import create_train_model
    from pce_timm.train.recipe import parse_namespace
    from pce_timm.train.schedule import apply_phase

    cfg = load_sweep_config(sweep)
    cells = {cell.name: cell for cell in cfg.cells}
    if name not in cells:
        raise ValueError(f'--campaign-cells: {sweep} has no cell {name!r}; its cells: {", ".join(cells)}')
    if any('{runs}' in str(value) for value in cells[name].options.values()):
        raise ValueError(f'--campaign-cells: cell {name!r} starts from another cell\'s runs, so it has no model '
                         'to build before they exist; time the cell it starts from instead.')
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / 'recipe.yaml'
        recipe.write_text(yaml.safe_dump(run_recipe(cfg, cells[name], 0, Path(tmp))), encoding='utf-8')
        flat = vars(parse_namespace(['--config', str(recipe)]))
    train = TrainConfig.from_flat(flat)
    info = dataset_info(train.data.dataset)
    in_chans = train.data.in_chans or info['in_chans']
    size = (train.data.img_size,) * 2 if train.data.img_size else tuple(info['img_size'])
    torch.manual_seed(0)
    model = create_train_model(train.model, info['num_classes'], in_chans)
    apply_phase(model, None, train.schedule.phases[-1])
    return model, (flat['batch_size'], in_chans, *size)


def campaign_cases(sweep: Optional[Path] = None, names: Sequence[str] = DEFAULT_CELLS) -> Tuple[List[Case], tuple]:
    """One case per cell, each timed against the first (the dense cell), and the batch shape they share.

    Raises:
        ValueError: An unknown cell, or cells whose recipes feed different batch shapes.
    """
    from pce_timm.sweep import load_sweep_config

    sweep = Path(sweep or DEFAULT_SWEEP)
    kinds = {cell.name: cell.kind for cell in load_sweep_config(sweep).cells}
    cases, shape = [], None
    for name in names:
        model, cell_shape = cell_model(sweep, name)
        if shape is not None and cell_shape != shape:
            raise ValueError(f'--campaign-cells: cell {name!r} trains on batches of {list(cell_shape)}, the first '
                             f'cell on {list(shape)}; time cells of one recipe shape together.')
        shape = cell_shape
        info = {'role': kinds[name], 'baseline': None if not cases else names[0],
                'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
                'gmacs': count_gmacs(model, shape[-1], in_chans=shape[1], batch_size=shape[0])}
        cases.append(Case(name, lambda m=model: m, info, {names[0]: 1.0}))
    return cases, shape
