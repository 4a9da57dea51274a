"""--val-fraction: a validation split held out of the training split, for choosing recipes (sweep.py)."""
import copy
import json

import datasets
import numpy as np
import pytest
import yaml

from pce_timm.train import RecipeError, parse_args, train
from pce_timm.train.data import holdout_split, load_data

TINY = dict(
    model='pce_resnet18', dataset='digits', stem_type='cifar', pce_stages=[1], patch_size=2, num_experts=2, top_k=1,
    model_kwargs={'channels': [8, 16, 32, 64], 'stem_width': 8}, epochs=1, batch_size=32, no_aug=True,
    max_train_samples=128, log_with=['csv'], progress=False, key_init_batches=1, phases=None,
)
pytestmark = pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py


def _args(tmp_path, *extra, **overrides):
    recipe = copy.deepcopy(TINY)
    recipe.update(overrides)
    (tmp_path / 'recipe.yaml').write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))
    return parse_args(['--config', str(tmp_path / 'recipe.yaml'), '--output-dir', str(tmp_path / 'run'), *extra])


def test_holdout_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(3), [20, 30, 50])
    data = datasets.Dataset.from_dict({'idx': np.arange(100), 'label': labels})
    rest, held_out = holdout_split(data, 0.1)
    assert np.bincount(held_out['label']).tolist() == [2, 3, 5]  # every 10th image of each class
    rest_idx, held_idx = list(rest['idx']), list(held_out['idx'])
    assert sorted(rest_idx + held_idx) == list(range(100)) and not set(rest_idx) & set(held_idx)
    again_rest, again_held_out = holdout_split(data, 0.1)
    assert list(again_held_out['idx']) == held_idx and list(again_rest['idx']) == rest_idx


def test_val_fraction_replaces_the_eval_split_with_a_part_of_train(tmp_path):
    cfg = _args(tmp_path, '--val-fraction', '0.2')
    assert cfg.data.eval_split == 'train-holdout'
    bundle = load_data(cfg.data)
    full = load_data(_args(tmp_path).data, splits=('train',)).train
    assert len(bundle.train) + len(bundle.eval) == len(full)
    assert len(bundle.eval) == pytest.approx(0.2 * len(full), abs=10)


@pytest.mark.parametrize('extra, message', [
    (['--val-fraction', '0.7'], r'val_fraction: got 0\.7; accepted: a fraction in \(0, 0\.5\]'),
    (['--val-fraction', '0.1', '--eval-split', 'train'], r"eval_split: got 'train'; accepted: the default"),
])
def test_bad_val_fraction_is_a_clear_error(tmp_path, extra, message):
    with pytest.raises(RecipeError, match=message):
        _args(tmp_path, *extra)


def test_a_run_with_val_fraction_evaluates_on_the_held_out_images(tmp_path):
    results = train(_args(tmp_path, '--val-fraction', '0.1'))
    assert results['eval_split'] == 'train-holdout'
    saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert saved['eval_split'] == 'train-holdout' and saved['config']['val_fraction'] == 0.1
    full = load_data(_args(tmp_path).data, splits=('train',)).train
    _, held_out = holdout_split(full, 0.1)
    for layer in saved['routing'].values():  # 2x2 patches of each 4x4 map of stage 1
        assert sum(layer['usage_counts']) == 4 * len(held_out)  # evaluated on exactly the held-out images
