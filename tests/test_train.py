"""Training library: recipes, phases, the loop on real data, checkpoints and exact resume, DDP on 2 CPU ranks.

Real data throughout: scikit-learn's 8x8 digits (bundled, offline) and a tiny PCE-ResNet-18 (widths 8..64,
PCE in stages 1-2, attention in stage 2), one torch thread, so every run takes seconds.
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from pce_timm.data import DatasetNotFoundError, create_dataset_transform, load_image_dataset
from pce_timm.train import NonFiniteLossError, RecipeError, parse_args, parse_phases, train
from pce_timm.train.config import model_kwargs
from pce_timm.train.engine import Criterion, train_one_epoch
from pce_timm.train.models import FREEZE_CHOICES, freeze_parts, load_model
from pce_timm.train.optim import param_groups
from pce_timm.train.schedule import GROUPS, phase_at
from pce_timm.train.trainer import _setup

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    model='pce_resnet18', dataset='digits', stem_type='cifar', pce_stages=[1, 2], patch_size=1, num_experts=4,
    attention=True, model_kwargs={'channels': [8, 16, 32, 64], 'stem_width': 8}, epochs=3, batch_size=32,
    lr=0.005, weight_decay=0.05, no_aug=True, max_train_samples=256, max_eval_samples=128, log_with=['csv'],
    progress=False, key_init_batches=2,
    phases=[{'name': 'stabilise', 'epochs': 1, 'routing': 'positional', 'noise': 1.0},
            {'name': 'router', 'epochs': 1, 'routing': 'router', 'gumbel_tau': 0.5},
            {'name': 'attention', 'routing': 'router', 'attention': True}],
)


def write_recipe(path: Path, **overrides) -> Path:
    recipe = copy.deepcopy(TINY)
    recipe.update(overrides)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    path.write_text(yaml.safe_dump(recipe))
    return path


def tiny_args(tmp_path: Path, *extra: str, **overrides):
    recipe = write_recipe(tmp_path / 'recipe.yaml', **overrides)
    return parse_args(['--config', str(recipe), '--output-dir', str(tmp_path / 'run'), *extra])


pytestmark = pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """One 3-phase run (positional -> router + Gumbel -> attention) on 512 digits."""
    tmp = tmp_path_factory.mktemp('trained')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    results = train(tiny_args(tmp, max_train_samples=512, max_eval_samples=None))
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)
    return tmp / 'run', results


# ---------------------------------------------------------------------------------------------------------
# recipes and phases


@pytest.mark.parametrize('overrides, expected', [
    ({'epochs': -1}, ['epochs', '-1', 'integer >= 1']),
    ({'lr': 0}, ['lr', 'a number > 0']),
    ({'lr': -0.1}, ['lr', '-0.1']),
    ({'bogus_key': 1}, ["unknown key 'bogus_key'", 'Accepted keys']),
    ({'batchsize': 8}, ["unknown key 'batchsize'", 'batch_size']),
    ({'mixed_precision': 'fp8'}, ['mixed_precision', "'fp8'", 'no, fp16, bf16']),
    ({'router': 'magic'}, ['router', 'cosine, mlp, positional, uniform']),
    ({'freeze': ['experts', 'head']}, ['freeze', "'head'", 'experts, router, backbone']),
    ({'batch_size': 'many'}, ['batch_size', "'many'"]),
    ({'phases': [{'epochs': 3, 'routing': 'magic'}]},
     ['phases[0].routing', "'magic'", 'router, positional, uniform, ema']),
    ({'phases': [{'epochs': 3, 'routng': 'router'}]}, ['phases[0]', "'routng'", 'accepted']),
    ({'phases': [{'epochs': 1}, {'epochs': 1}]}, ['phases', 'cover 2', 'epochs=3']),
    ({'phases': [{'epochs': -1}, {'routing': 'router'}]}, ['phases[0].epochs', '-1']),
    ({'phases': [{'epochs': 3, 'keys': 'sticky'}]}, ['phases[0].keys', 'learnable, ema, frozen']),
    ({'phases': [{'epochs': 1}, {'routing': 'positional'}]}, ['phases[1].routing', 'last phase']),
    ({'phases': [{'epochs': 3, 'train': ['experts', 'heads']}]}, ['phases[0].train', 'experts, router, embed']),
])
def test_bad_recipe_values_name_the_key(tmp_path, overrides, expected):
    with pytest.raises(RecipeError) as info:
        tiny_args(tmp_path, **overrides)
    for text in expected:
        assert text in str(info.value), str(info.value)


def test_recipe_sets_defaults_and_cli_wins(tmp_path):
    args = tiny_args(tmp_path, '--lr', '0.01', lr='1e-3', weight_decay='0')  # YAML reads 1e-3 as a string
    assert args.lr == 0.01 and args.weight_decay == 0.0
    assert args.pce_stages == [1, 2] and args.model_kwargs == {'channels': [8, 16, 32, 64], 'stem_width': 8}
    assert [p.name for p in args.phases] == ['stabilise', 'router', 'attention']
    assert model_kwargs(args.model)['pce_stages'] == (1, 2)
    soft = tiny_args(tmp_path, top_k='soft')
    # 'soft' survives create_model (None would not)
    model = timm.create_model(soft.model.name, **model_kwargs(soft.model))
    soft_flags = [m.soft for m in model.modules() if hasattr(m, 'soft')]
    assert soft_flags and all(soft_flags)


def test_phase_layout_and_trainable_groups():
    phases = parse_phases([{'name': 'a', 'epochs': 0.5, 'routing': 'uniform'},
                           {'name': 'b', 'epochs': 1, 'routing': 'ema'},
                           {'name': 'c', 'keys': 'frozen', 'gumbel_tau': 1.0},
                           ], epochs=4)
    assert [(p.start, p.end) for p in phases] == [(0.0, 0.5), (0.5, 1.5), (1.5, 4.0)]
    assert [phase_at(phases, t).name for t in (0, 0.49, 0.5, 1.49, 1.5, 3.99, 10)] == list('aabbccc')
    assert phases[0].trainable == ('experts', 'rest')
    assert phases[1].trainable == ('experts', 'rest') and phases[1].ema_keys
    assert phases[2].trainable == ('experts', 'embed', 'rest') and not phases[2].ema_keys
    default = parse_phases(None, epochs=2)
    assert len(default) == 1 and default[0].attention and set(default[0].trainable) == set(GROUPS)


def test_param_groups_cover_every_parameter_once(tmp_path):
    args = tiny_args(tmp_path)
    model = timm.create_model(args.model.name, num_classes=10, in_chans=1, **model_kwargs(args.model))
    groups = param_groups(model, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g['params']]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_name = {name: g for g in groups for name, p in model.named_parameters() if any(p is q for q in g['params'])}
    assert by_name['layer1.0.conv1.weight']['group'] == 'rest'
    assert by_name['layer2.0.conv1.experts.weight']['group'] == 'experts'
    assert by_name['layer2.0.conv1.router.keys']['group'] == 'router'
    assert by_name['layer2.0.conv1.router.keys']['weight_decay'] == 0.0
    assert {by_name[n]['group'] for n in by_name if '.conv1.embed.' in n} == {'embed'}
    assert {by_name[n]['group'] for n in by_name if '.conv1.attn.' in n} == {'attention'}
    assert any(g['group'] == 'attention' for g in groups)
    assert by_name['fc.bias']['weight_decay'] == 0.0 and by_name['fc.weight']['weight_decay'] == 0.05


# ---------------------------------------------------------------------------------------------------------
# phases really change what trains


def _snapshot(model, part):
    out = {}
    for name, p in model.named_parameters():
        inside = f'.conv1.{part}.' in name if part != 'attention' else '.conv1.attn.' in name
        if inside:
            out[name] = p.detach().clone()
    assert out, part
    return out


def _changed(before, model):
    params = dict(model.named_parameters())
    return [name for name, value in before.items() if not torch.equal(value, params[name].detach())]


@pytest.mark.parametrize('first_phase, keys_should_move', [
    ({'name': 'stabilise', 'epochs': 1, 'routing': 'positional', 'noise': 1.0}, False),
    ({'name': 'stabilise', 'epochs': 1, 'routing': 'ema', 'ema_decay': 0.9}, True),
    ({'name': 'stabilise', 'epochs': 1, 'routing': 'uniform'}, False),
])
def test_phase_switches_change_what_trains(tmp_path, first_phase, keys_should_move):
    phases = [first_phase, dict(TINY['phases'][1]), dict(TINY['phases'][2])]
    ctx = _setup(tiny_args(tmp_path, phases=phases, max_train_samples=128))
    model = ctx.accelerator.unwrap_model(ctx.model)
    parts = {part: _snapshot(model, part) for part in ('experts', 'router', 'embed', 'attention')}

    train_one_epoch(ctx, 0, lambda update: None)  # phase 1
    assert _changed(parts['experts'], model), 'experts must train in phase 1'
    assert not _changed(parts['embed'], model), 'the patch embedding must not train in phase 1'
    assert bool(_changed(parts['router'], model)) == keys_should_move, 'keys move in phase 1 only by EMA'
    assert not _changed(parts['attention'], model), 'attention must not train before phase 3'

    parts = {part: _snapshot(model, part) for part in ('router', 'embed', 'attention')}
    train_one_epoch(ctx, 1, lambda update: None)  # phase 2: router on
    assert _changed(parts['router'], model) and _changed(parts['embed'], model)
    assert not _changed(parts['attention'], model), 'attention must not train before phase 3'

    train_one_epoch(ctx, 2, lambda update: None)  # phase 3: attention on
    assert _changed(parts['attention'], model)
    assert all(layer.attn_gate.item() == 1.0 for layer in ctx.phases.layers.values() if layer.attn is not None)


def test_frozen_keys_stay_put(tmp_path):
    phases = [{'name': 'router', 'epochs': 3, 'routing': 'router', 'keys': 'frozen'}]
    ctx = _setup(tiny_args(tmp_path, phases=phases, max_train_samples=64))
    model = ctx.accelerator.unwrap_model(ctx.model)
    keys, embed = _snapshot(model, 'router'), _snapshot(model, 'embed')
    train_one_epoch(ctx, 0, lambda update: None)
    assert not _changed(keys, model) and _changed(embed, model)


# ---------------------------------------------------------------------------------------------------------
# a whole run on real data


def test_training_lowers_the_loss(trained_run):
    _, results = trained_run
    history = results['history']
    assert len(history) == 3 and [h['phase'] for h in history] == ['stabilise', 'router', 'attention']
    assert history[-1]['train_loss'] < history[0]['train_loss'] - 0.3
    assert history[-1]['eval_loss'] < history[0]['eval_loss']
    assert results['top1'] > 40  # chance is 10


def test_results_json_schema(trained_run):
    run, returned = trained_run
    results = json.loads((run / 'results.json').read_text())
    assert results == json.loads(json.dumps(returned))
    for key in ('top1', 'top5', 'loss', 'train_loss', 'wall_time_s', 'num_params', 'epochs', 'updates',
                'routing', 'routing_summary', 'routing_history', 'history', 'config', 'versions'):
        assert key in results, key
    assert results['status'] == 'completed' and results['epochs'] == 3 and results['wall_time_s'] > 0
    assert 0 <= results['top1'] <= results['top5'] <= 100
    assert results['config']['model'] == 'pce_resnet18' and results['config']['phases'][1]['gumbel_tau'] == 0.5
    layers = ['layer2.0.conv1', 'layer2.1.conv1', 'layer3.0.conv1', 'layer3.1.conv1']
    assert sorted(results['routing']) == layers
    assert [entry['epoch'] for entry in results['routing_history']] == [1, 2, 3]
    for entry in results['routing_history']:
        assert sorted(entry['layers']) == layers
        for stats in entry['layers'].values():
            assert 0 <= stats['usage_entropy'] <= 1 + 1e-6
            assert stats['imbalance'] is None or stats['imbalance'] >= 1
            assert stats['mean_router_entropy'] >= 0 and isinstance(stats['dead_experts'], list)
            assert abs(sum(stats['usage_share']) - 1) < 1e-4
    assert results['routing_history'][0]['layers']['layer2.0.conv1']['usage_entropy'] > 0.95  # positional phase
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert saved['lr'] == 0.005 and saved['phases'][0]['routing'] == 'positional'
    metrics = (run / 'logs' / 'metrics.csv').read_text()
    assert 'eval/top1' in metrics and 'routing/layer2.0.conv1/usage_entropy' in metrics


def test_local_dir_reload_gives_the_same_logits(trained_run):
    run, _ = trained_run
    reloaded = timm.create_model(f'local-dir:{run / "model"}', pretrained=True).eval()
    args = parse_args(['--config', str(run / 'config.yaml')])
    rebuilt = timm.create_model(args.model.name, num_classes=10, in_chans=1, **model_kwargs(args.model)).eval()
    checkpoint = sorted((run / 'checkpoints').iterdir())[-1]
    rebuilt.load_state_dict(load_file(str(checkpoint / 'model.safetensors')))
    transform = create_dataset_transform(reloaded, is_training=False)
    assert reloaded.pretrained_cfg['mean'] == (0.3053,) or list(reloaded.pretrained_cfg['mean']) == [0.3053]
    data = load_image_dataset('digits', 'test')
    x = torch.stack([transform(data[i]['image']) for i in range(16)])
    with torch.no_grad():
        assert torch.equal(reloaded(x), rebuilt(x))


def test_load_model_new_classes_and_freeze(trained_run):
    run, _ = trained_run
    model = load_model(str(run), num_classes=3)
    assert model.num_classes == 3 and model.fc.out_features == 3
    source = load_file(str(run / 'model' / 'model.safetensors'))
    assert torch.equal(model.state_dict()['layer2.0.conv1.experts.weight'], source['layer2.0.conv1.experts.weight'])
    checkpoint = sorted((run / 'checkpoints').iterdir())[-1]
    assert load_model(str(checkpoint), num_classes=5).num_classes == 5
    norms = freeze_parts(model, ['experts'])
    assert norms and not model.layer2[0].conv1.experts.weight.requires_grad and model.fc.weight.requires_grad
    freeze_parts(model, ['backbone'])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ['fc.weight', 'fc.bias']
    with pytest.raises(ValueError, match='accepted'):
        freeze_parts(model, ['head'])
    assert FREEZE_CHOICES == ('experts', 'router', 'backbone')


# ---------------------------------------------------------------------------------------------------------
# failures


def test_missing_dataset_fails_before_training(tmp_path):
    args = tiny_args(tmp_path, dataset='fashion_mnist', data_dir=str(tmp_path / 'nowhere'))
    with pytest.raises(DatasetNotFoundError, match='not found') as info:
        train(args)
    assert 'data_dir' in str(info.value)
    assert not (tmp_path / 'run').exists(), 'nothing may be written before the data is found'


def test_unreadable_dataset_fails_before_training(tmp_path):
    data_dir = tmp_path / 'fmnist'
    data_dir.mkdir()
    for name in ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                 't10k-labels-idx1-ubyte'):
        (data_dir / name).write_bytes(b'\x00\x00\x08\x03garbage')
    with pytest.raises(DatasetNotFoundError):
        train(tiny_args(tmp_path, dataset='fashion_mnist', data_dir=str(data_dir)))
    assert not (tmp_path / 'run').exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {'n': 0}
    original = Criterion.__call__

    def poisoned(self, model, logits, target):
        calls['n'] += 1
        loss, parts = original(self, model, logits, target)
        return (loss * float('nan') if calls['n'] >= 6 else loss), parts

    monkeypatch.setattr(Criterion, '__call__', poisoned)
    args = tiny_args(tmp_path, '--checkpoint-steps', '2')
    with pytest.raises(NonFiniteLossError) as info:
        train(args)
    message = str(info.value)
    assert 'nan' in message and 'batch 6' in message and 'last good checkpoint' in message
    good = Path(message.split('last good checkpoint is ')[1].split(' ')[0])
    assert good.name == 'checkpoint_1' and (good / 'model.safetensors').is_file() and (good / '.complete').exists()
    assert not (tmp_path / 'run' / 'model').exists() and not (tmp_path / 'run' / 'results.json').exists()
    assert json.loads(json.dumps(torch.load(good / 'custom_checkpoint_0.pkl', weights_only=False)['update'])) == 4


def test_existing_checkpoints_need_resume(tmp_path):
    (tmp_path / 'run' / 'checkpoints' / 'checkpoint_0').mkdir(parents=True)
    with pytest.raises(RecipeError, match='--resume auto'):
        train(tiny_args(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL, and 2 processes


def _cli_env():
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('ACCELERATE_MIXED_PRECISION', None)
    return env


def test_resume_after_sigkill_is_exact(tmp_path):
    recipe = write_recipe(tmp_path / 'recipe.yaml', epochs=3, max_train_samples=384, scale=[0.6, 1.0], no_aug=False,
                          hflip=0.5, mixup=0.2, checkpoint_steps=4, checkpoint_limit=3,
                          phases=[{'name': 'stabilise', 'epochs': 1, 'routing': 'ema'},
                                  {'name': 'router', 'epochs': 1, 'routing': 'router', 'gumbel_tau': 0.5},
                                  {'name': 'attention', 'routing': 'router', 'attention': True}])
    command = [sys.executable, str(ROOT / 'scripts' / 'train.py'), '--config', str(recipe)]
    killed = tmp_path / 'killed'
    process = subprocess.Popen(command + ['--output-dir', str(killed)], env=_cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / 'checkpoints' / 'checkpoint_0' / '.complete'
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists(), process.stderr.read().decode()[-2000:]
    assert not (killed / 'results.json').exists(), 'the run finished before it could be killed'

    resumed = subprocess.run(command + ['--output-dir', str(killed), '--resume', 'auto'], env=_cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'resumed from' in resumed.stdout

    reference = train(parse_args(['--config', str(recipe), '--output-dir', str(tmp_path / 'reference')]))
    a = load_file(str(tmp_path / 'reference' / 'model' / 'model.safetensors'))
    b = load_file(str(killed / 'model' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), 'weights differ after resume'
    results = json.loads((killed / 'results.json').read_text())
    strip = lambda history: [{k: v for k, v in e.items() if k != 'epoch_time_s'} for e in history]  # noqa: E731
    assert strip(results['history']) == strip(reference['history'])
    assert results['routing_history'] == reference['routing_history']


def _two_rank_entry(argv):
    AcceleratorState._reset_state(True)  # the fork inherited the parent's single-process state
    torch.set_num_threads(1)
    train(parse_args(argv))


# debug_launcher forks; a fork of this pytest process (OpenMP pools, compile workers and server threads left by
# earlier tests) can deadlock, so the launcher runs in a fresh interpreter that has started no threads yet.
_LAUNCH = ('import sys; sys.path.insert(0, sys.argv[1]); from accelerate import debug_launcher; '
           'from test_train import _two_rank_entry; '
           'debug_launcher(_two_rank_entry, args=(sys.argv[2:],), num_processes=2)')


def test_two_processes_with_debug_launcher(tmp_path):
    recipe = write_recipe(tmp_path / 'recipe.yaml', epochs=2, max_train_samples=256, max_eval_samples=101,
                          eval_batch_size=16, phases=[{'name': 'positional', 'epochs': 0.5, 'routing': 'positional'},
                                                      {'name': 'ema', 'epochs': 0.5, 'routing': 'ema'},
                                                      {'name': 'router', 'routing': 'router', 'attention': True}])
    launched = subprocess.run([sys.executable, '-c', _LAUNCH, str(ROOT / 'tests'), '--config', str(recipe),
                               '--output-dir', str(tmp_path / 'run')], env=_cli_env(), capture_output=True, text=True,
                              timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    results = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert results['num_processes'] == 2
    assert results['routing_history'][-1]['layers']['layer2.0.conv1']['usage_share']
    assert [h['phase'] for h in results['history']] == ['ema', 'router']
    assert results['updates'] == 2 * 256 // (32 * 2)  # each rank sees half of every epoch
    evaluation = json.loads((tmp_path / 'run' / 'results.json').read_text())['routing']['layer2.0.conv1']
    assert sum(evaluation['usage_counts']) % 101 == 0, 'gather_for_metrics must count each eval image once'
    model = timm.create_model(f'local-dir:{tmp_path / "run" / "model"}', pretrained=True)
    assert model.num_classes == 10


def test_accelerate_launch_on_cpu_runs_two_ranks(tmp_path):
    """`accelerate launch` with the shipped CPU config must give one 2-rank run, not two 1-process runs."""
    recipe = write_recipe(tmp_path / 'recipe.yaml', epochs=1, max_train_samples=128, max_eval_samples=64, phases=None)
    launched = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
         str(ROOT / 'scripts' / 'configs' / 'accelerate' / 'cpu_2proc.yaml'), str(ROOT / 'scripts' / 'train.py'),
         '--config', str(recipe), '--output-dir', str(tmp_path / 'run'), '--progress', 'false'],
        env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert json.loads((tmp_path / 'run' / 'results.json').read_text())['num_processes'] == 2


# ---------------------------------------------------------------------------------------------------------
# the CLIs leave the allocator alone unless asked


@pytest.mark.parametrize('value, tuned', [(None, False), ('0', False), ('yes', False), ('1', True)])
def test_run_cli_tunes_the_allocator_only_when_opted_in(monkeypatch, value, tuned):
    import pce_timm.runtime as runtime
    from pce_timm.train.cli import run_cli

    calls = []
    monkeypatch.setattr(runtime, 'keep_freed_memory', lambda: calls.append(1) or True)
    if value is None:
        monkeypatch.delenv(runtime.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(runtime.ENV_SWITCH, value)
    assert run_cli(lambda: None) == 0
    assert calls == ([1] if tuned else [])
    assert runtime.keep_freed_memory_if_enabled() is tuned


def test_pce_layers_has_one_home_and_looks_through_wrappers(tmp_path):
    from pce_timm import analysis, layers
    from pce_timm.train import schedule

    args = tiny_args(tmp_path)
    model = timm.create_model(args.model.name, num_classes=10, in_chans=1, **model_kwargs(args.model))

    class Wrapper(torch.nn.Module):  # what DDP / accelerate put around a model: the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert analysis.pce_layers is layers.pce_layers and schedule.pce_layers is layers.pce_layers
    names = list(layers.pce_layers(model))
    assert names == ['layer2.0.conv1', 'layer2.1.conv1', 'layer3.0.conv1', 'layer3.1.conv1']
    wrapped = layers.pce_layers(Wrapper(model))
    assert list(wrapped) == names and all(wrapped[n] is m for n, m in layers.pce_layers(model).items())


# ---------------------------------------------------------------------------------------------------------
# the typed config


def test_every_flag_lives_in_exactly_one_config_section_and_round_trips(tmp_path):
    import dataclasses

    from pce_timm.train.config import SECTIONS, TrainConfig, build_parser, config_dict, save_config

    cfg = tiny_args(tmp_path, '--lr', '0.01', '--opt-betas', '0.8', '0.9')
    dests = {a.dest for a in build_parser()._actions if a.dest != 'help'}
    assert set(cfg.flat()) == dests
    fields = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(fields) == len(set(fields)), 'a field name in two sections would make the flat key ambiguous'
    assert TrainConfig.from_flat(cfg.flat()) == cfg
    saved = config_dict(cfg)
    assert set(saved) == dests - {'config'} and list(saved) == sorted(saved)
    save_config(cfg, tmp_path / 'saved')
    again = parse_args(['--config', str(tmp_path / 'saved' / 'config.yaml')])
    assert config_dict(again) == saved and again.optim.opt_betas == [0.8, 0.9]


def test_config_sections_are_typed_frozen_and_read_flat(tmp_path):
    import dataclasses

    from pce_timm.train.config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig

    cfg = tiny_args(tmp_path, '--lr', '0.01')
    assert isinstance(cfg.model, ModelConfig) and cfg.model.name == 'pce_resnet18' and cfg.model.pce_stages == [1, 2]
    assert isinstance(cfg.optim, OptimConfig) and cfg.optim.lr == 0.01 and cfg.lr == 0.01
    assert isinstance(cfg.data, DataConfig) and cfg.data.eval_batch_size == 64 and cfg.dataset == 'digits'
    assert isinstance(cfg.schedule, ScheduleConfig) and [p.name for p in cfg.schedule.phases] == [
        'stabilise', 'router', 'attention']
    assert cfg.checkpoint.output_dir == str(tmp_path / 'run') and cfg.log.progress is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(AttributeError, match='no_such_key'):
        getattr(cfg, 'no_such_key')  # noqa: B009
    changed = cfg.replace(pretrained=True, lr=0.5)
    assert changed.model.pretrained and changed.optim.lr == 0.5 and not cfg.model.pretrained and cfg.optim.lr == 0.01
    with pytest.raises(RecipeError, match='bogus'):
        cfg.replace(bogus=1)


def test_optimizer_and_criterion_take_their_sections(tmp_path):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from pce_timm.train.engine import create_mixup
    from pce_timm.train.optim import create_optimizer

    cfg = tiny_args(tmp_path, '--opt', 'sgd', '--lr', '0.02', '--momentum', '0.5', '--smoothing', '0.1')
    model = timm.create_model(cfg.model.name, num_classes=10, in_chans=1, **model_kwargs(cfg.model))
    optimizer = create_optimizer(cfg.optim, model)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults['momentum'] == 0.5
    assert {(g['lr'], g['initial_lr']) for g in optimizer.param_groups} == {(0.02, 0.02)}
    assert {g['group'] for g in optimizer.param_groups} == set(GROUPS)
    assert create_mixup(cfg.augment, cfg.loss.smoothing, 10) is None
    assert isinstance(Criterion(cfg.loss).ce, LabelSmoothingCrossEntropy)
    mixing = tiny_args(tmp_path, '--mixup', '0.2')
    mixup = create_mixup(mixing.augment, mixing.loss.smoothing, 10)
    criterion = Criterion(mixing.loss, mixup)
    assert criterion.mixup is mixup and mixup.mixup_alpha == 0.2 and isinstance(criterion.ce, SoftTargetCrossEntropy)


def test_format_table_aligns_columns_and_checks_align():
    from pce_timm.train.evaluation import format_table

    text = format_table([['a', 1.5, None], ['long name', 12, [1, 2]]], ['layer', 'x', 'dead'], align='<>>')
    assert text.split('\n') == ['layer          x  dead',
                                '---------  -----  ----',
                                'a          1.500   inf',
                                'long name     12     2']
    assert format_table([['a', 'b']], ['h1', 'h2']).split('\n')[2] == 'a   b '
    with pytest.raises(ValueError, match='align'):
        format_table([['a']], ['h'], align='<>')
