"""Dense-task runs end to end on a tiny composed set: a fast segmentation smoke run (loss goes down, the run
folder is complete, evaluate_dense gives the same numbers), a few steps on a PCE-ViT hybrid, then (slow)
detection, exact resume and 2 ranks."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pce_timm.data.compose import DEFAULT_SOURCE_DIR, ComposeConfig, write_composed_voc
from pce_timm.tasks.loop import create_dense_model, evaluate_dense_run, load_dense_model, parse_dense_args, train_dense

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures('one_thread_fresh_accelerate'),  # tests/conftest.py
    pytest.mark.skipif(not Path(DEFAULT_SOURCE_DIR).is_dir(), reason='needs the Debian Fashion-MNIST package'),
]


@pytest.fixture(scope='module')
def composed(tmp_path_factory):
    out = tmp_path_factory.mktemp('composed') / 'set'
    write_composed_voc(out, ComposeConfig(num_train=8, num_val=4, canvas_size=64, seed=0), progress=False)
    return out


def _argv(data_dir: Path, out: Path, *extra: str):
    # 64 px canvases, narrow widths; PCE in stages 1-2 with 2 px / 1 px patches: 4x4 grids at 64 px
    return ['--model', 'pce_resnet18', '--dataset', 'voc', '--data-dir', str(data_dir), '--img-size', '64',
            '--model-kwargs', 'channels=[8,16,32,64]', 'patch_size=[8,2,1,1]', '--pce-stages', '1', '2',
            '--batch-size', '4', '--eval-batch-size', '4', '--lr', '0.005', '--no-aug', '--log-with', 'csv',
            '--progress', 'false', '--output-dir', str(out), '--checkpoint-limit', '3', '--key-init-batches', '1',
            '--phases', '[{name: router, routing: router, keys: learnable}]', *extra]


def test_segmentation_run_lowers_the_loss_and_evaluates_again(composed, tmp_path):
    results = train_dense('segmentation', _argv(composed, tmp_path / 'run', '--epochs', '3'))
    history = results['history']
    assert history[-1]['train_loss'] < history[0]['train_loss']
    assert 0.0 <= results['miou'] <= 1.0 and set(results['per_class']) == set(json.loads(
        (tmp_path / 'run' / 'model' / 'dense_config.json').read_text())['class_names'])
    assert results['task'] == 'segmentation' and results['config']['arch'] == 'unet'
    assert len(results['routing']) == 4 and (tmp_path / 'run' / 'routing.png').stat().st_size > 10_000
    assert json.loads((tmp_path / 'run' / 'results.json').read_text())['miou'] == results['miou']
    again = evaluate_dense_run(tmp_path / 'run', progress=False)
    assert again['miou'] == pytest.approx(results['miou'], abs=1e-6)
    assert again['routing'] == results['routing']
    model, config = load_dense_model(tmp_path / 'run')
    assert config['model_kwargs']['patch_size'] == [8, 2, 1, 1]


def test_dense_recipe_keys_round_trip_and_errors(composed, tmp_path):
    cfg, dense = parse_dense_args('segmentation', ['--config', str(ROOT / 'scripts/configs/dense_segmentation.yaml'),
                                                   '--data-dir', str(composed), '--arch', 'fpn'])
    assert dense['arch'] == 'fpn' and cfg.data.eval_split == 'val' and cfg.data.img_size == 128
    _, dense = parse_dense_args('segmentation', ['--model', 'resnet18', '--dataset', 'voc',
                                                 '--decoder-channels', '64', '32', '16', '16', '8'])
    assert dense['decoder_channels'] == [64, 32, 16, 16, 8]
    model = create_dense_model({'task': 'segmentation', 'arch': 'unet', 'backbone': 'resnet18', 'num_classes': 3,
                                'decoder_channels': dense['decoder_channels']})
    assert model.segmentation_head[0].in_channels == 8
    from pce_timm.train.recipe import RecipeError
    with pytest.raises(SystemExit):
        parse_dense_args('detection', ['--model', 'resnet18', '--dataset', 'voc', '--arch', 'unet'])
    with pytest.raises(RecipeError, match='output_stride=16 dilates'):
        train_dense('segmentation', _argv(composed, tmp_path / 'bad', '--arch', 'deeplabv3plus', '--pce-stages', '3'))


@pytest.mark.slow
def test_detection_run_lowers_the_loss(composed, tmp_path):
    results = train_dense('detection', _argv(composed, tmp_path / 'run', '--epochs', '3'))
    history = results['history']
    assert history[-1]['train_loss'] < history[0]['train_loss']
    assert results['map_50'] is not None and 0.0 <= results['map_50'] <= 1.0 and 'det_loss_classifier' in str(
        history[0])
    assert (tmp_path / 'run' / 'routing.png').is_file()
    again = evaluate_dense_run(tmp_path / 'run', progress=False)
    assert again['map_50'] == pytest.approx(results['map_50'], abs=1e-6)


@pytest.mark.slow
def test_resume_from_an_epoch_checkpoint_repeats_the_run(composed, tmp_path):
    full = train_dense('segmentation', _argv(composed, tmp_path / 'full', '--epochs', '2'))
    part = tmp_path / 'part'
    shutil.copytree(tmp_path / 'full', part)
    checkpoints = sorted((part / 'checkpoints').iterdir())
    for extra in checkpoints[1:]:  # keep the checkpoint after epoch 1 only
        shutil.rmtree(extra)
    shutil.rmtree(part / 'model')
    (part / 'results.json').unlink()
    resumed = train_dense('segmentation', ['--resume', 'auto', '--output-dir', str(part), '--progress', 'false'])
    assert resumed['history'] == full['history'] or [
        {k: v for k, v in h.items() if k != 'epoch_time_s'} for h in resumed['history']] == [
        {k: v for k, v in h.items() if k != 'epoch_time_s'} for h in full['history']]
    assert resumed['miou'] == full['miou']


@pytest.mark.slow
def test_two_processes_through_accelerate_launch(composed, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    launched = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
         str(ROOT / 'scripts' / 'configs' / 'accelerate' / 'cpu_2proc.yaml'), str(ROOT / 'scripts' /
                                                                                 'train_segmentation.py'),
         *_argv(composed, tmp_path / 'run', '--epochs', '1', '--eval-batch-size', '1')],
        env=env, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['num_processes'] == 2
    # 1 process over the same 4 val images, one image a batch as each rank had them (a barely trained model has
    # near-tied logits, whose argmax a different batch composition can flip): the ranks' shards added up
    again = evaluate_dense_run(tmp_path / 'run', batch_size=1, progress=False)
    assert again['miou'] == pytest.approx(results['miou'], abs=1e-6)
    assert again['num_samples'] == 4


def test_vit_hybrid_segmentation_run(composed, tmp_path):
    """train_segmentation.py's loop on a PCE-ViT hybrid (Unet on its feature pyramid) for a few steps."""
    argv = _argv(composed, tmp_path / 'run', '--epochs', '1', '--max-train-samples', '4')
    argv[argv.index('--model') + 1] = 'pce_vit_hybrid_small_r18'
    kwargs = argv.index('--model-kwargs')
    argv[kwargs + 1:kwargs + 3] = ['embed_dim=64', 'num_heads=2', 'patch_size=[8,2,1,1]']  # 4x4 grids at 64 px
    results = train_dense('segmentation', argv)
    assert results['config']['model'] == 'pce_vit_hybrid_small_r18' and 0.0 <= results['miou'] <= 1.0
    # the PCE layers of the CNN stem (stages 1-2 = layer2 / layer3), routed inside smp's encoder
    assert set(results['routing']) == {f'encoder.model.model.patch_embed.backbone.layer{s}.{b}.conv1'
                                       for s in (2, 3) for b in (0, 1)}
    model, _ = load_dense_model(tmp_path / 'run')
    assert model.encoder.model.feature_info.reduction() == [2, 4, 8, 16, 32]
