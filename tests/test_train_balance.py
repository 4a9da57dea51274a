"""Balanced routing in training (issue 13): the loss-free bias update, its sync over processes, the flags and
model args, and the routing statistics of results.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_model_args, save_for_hf

from pce_timm.layers import PCEConv2d, pce_layers
from pce_timm.layers.routing_stats import imbalance
from pce_timm.train import parse_phases, train
from pce_timm.train.balance import bias_step, last_loads, update_balance_bias, uses_balance_bias
from pce_timm.train.config import model_kwargs
from pce_timm.train.engine import PhaseController

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tests'))
from test_train import tiny_args  # noqa: E402  (the tiny digits recipe of the training tests)

pytestmark = pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py


def _skewed_layer(rate: float = 0.05, seed: int = 0, rule: str = 'sign') -> PCEConv2d:
    """A token-choice layer whose MLP router sends most patches to expert 0 (a hand-made skew)."""
    torch.manual_seed(seed)
    layer = PCEConv2d(4, 4, num_experts=4, patch_size=2, top_k=1, router='mlp', balance='bias',
                      bias_update_rate=rate, bias_update=rule)
    with torch.no_grad():
        layer.router.fc2.weight.normal_(0, 0.3)
        layer.router.fc2.bias.copy_(torch.tensor([2.0, 0.0, -0.5, -1.0]))
    return layer.train()


def _counts(layer: PCEConv2d) -> torch.Tensor:
    return torch.bincount(layer.last_expert_indices.reshape(-1), minlength=layer.num_experts)


def test_bias_updates_move_load_toward_uniform():
    layer = _skewed_layer()
    x = torch.randn(8, 4, 16, 16)
    with torch.no_grad():
        layer(x)
    start = imbalance(_counts(layer))
    assert start > 5
    for _ in range(150):
        with torch.no_grad():
            layer(torch.randn(8, 4, 16, 16))
        loads = update_balance_bias(layer)
        assert torch.equal(loads[''], last_loads(layer))
    with torch.no_grad():
        layer(x)
    assert imbalance(_counts(layer)) < 2.0 < start
    assert layer.balance_bias[0] < 0 < layer.balance_bias[3]  # the busy expert got cheaper... the starved dearer
    assert layer.router.fc2.bias.tolist() == [2.0, 0.0, -0.5, -1.0]  # nothing but the buffer moved


def test_bias_step_known_answers():
    load = torch.tensor([30.0, 10.0, 20.0, 20.0])  # mean 20
    torch.testing.assert_close(bias_step(load, 0.1, 'sign'), torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(bias_step(load, 0.1, 'proportional'), torch.tensor([-0.05, 0.05, 0.0, 0.0]))
    skewed = torch.tensor([100.0, 0.0, 0.0, 0.0])  # (mean - load) / mean = -3 for the busy one: bounded by the rate
    torch.testing.assert_close(bias_step(skewed, 0.1, 'proportional'), torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match='bias_update must be one of'):
        bias_step(load, 0.1, 'median')


def test_proportional_bias_settles_where_the_sign_rule_keeps_moving():
    """On noisy per-step loads (512 choices, 4 experts) both rules balance the skewed router, but only the
    proportional one stops moving: its bias varies over the last 100 updates by less than one rate, the sign
    rule's by several (every update moves every expert by the full rate)."""
    amplitude, final = {}, {}
    for rule in ('sign', 'proportional'):
        layer = _skewed_layer(rate=0.1, rule=rule)
        data = torch.Generator().manual_seed(123)
        history = []
        for _ in range(300):
            with torch.no_grad():
                layer(torch.randn(8, 4, 16, 16, generator=data))
            update_balance_bias(layer)
            history.append(layer.balance_bias.clone())
        last = torch.stack(history[-100:])
        amplitude[rule] = float((last.max(0).values - last.min(0).values).max())
        with torch.no_grad():
            layer(torch.randn(64, 4, 16, 16, generator=data))
        final[rule] = imbalance(_counts(layer))
    assert amplitude['proportional'] < 0.1 < 2 * 0.1 < amplitude['sign'], amplitude
    assert final['proportional'] < 1.35, final


def test_bias_update_is_sign_of_mean_minus_load_through_reduce():
    layer = _skewed_layer(rate=0.25)
    with torch.no_grad():
        layer(torch.randn(2, 4, 8, 8))
    calls = []

    def reduce(tensor):  # a stand-in for two processes with the same loads
        calls.append(tensor.clone())
        return 2 * tensor

    load = last_loads(layer)
    update_balance_bias(layer, reduce=reduce)
    assert len(calls) == 1 and torch.equal(calls[0], load)
    torch.testing.assert_close(layer.balance_bias, 0.25 * torch.sign(load.mean() - load))
    layer.balance = 'loss'  # a layer balanced by the loss is left alone
    assert update_balance_bias(layer) == {} and not uses_balance_bias(layer)


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    layer = _skewed_layer(rate=0.1)  # the same weights on both ranks
    proportional = _skewed_layer(rate=0.1, rule='proportional')
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(4, 4, 8, 8) * (1 + rank)
    with torch.no_grad():
        layer(x)
        proportional(x)
    local = last_loads(layer)
    update_balance_bias(layer)  # torch.distributed is initialised: all-reduce
    update_balance_bias(proportional)
    torch.save({'local': local, 'bias': layer.balance_bias.clone(), 'proportional': proportional.balance_bias.clone()},
               os.path.join(out_dir, f'rank{rank}.pt'))
    torch.distributed.destroy_process_group()


_SPAWN = ('import sys; sys.path.insert(0, sys.argv[1]); import torch.multiprocessing as mp; '
          'from test_train_balance import _sync_worker; '
          'mp.spawn(_sync_worker, args=(2, sys.argv[2], sys.argv[3]), nprocs=2)')


@pytest.mark.slow  # three interpreters importing torch and timm: ~2 min on 2 shared cores
def test_two_process_bias_sync(tmp_path):
    """Two gloo processes see different loads and end with the same bias, that of the summed loads."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    launched = subprocess.run([sys.executable, '-c', _SPAWN, str(ROOT / 'tests'), str(tmp_path / 'init'),
                               str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert not torch.equal(ranks[0]['local'], ranks[1]['local'])  # the test means something
    assert torch.equal(ranks[0]['bias'], ranks[1]['bias'])
    total = ranks[0]['local'] + ranks[1]['local']
    torch.testing.assert_close(ranks[0]['bias'], 0.1 * torch.sign(total.mean() - total))
    assert torch.equal(ranks[0]['proportional'], ranks[1]['proportional'])  # same weights and data: same loads
    torch.testing.assert_close(ranks[0]['proportional'],
                               0.1 * ((total.mean() - total) / total.mean()).clamp(-1.0, 1.0))


def test_create_model_round_trip_of_the_new_args(tmp_path):
    model = timm.create_model('pce_resnet18', num_experts=3, top_k=1, pce_stages=(2,), choice='token', balance='bias',
                              bias_update_rate=0.02, bias_update='proportional', num_classes=5).eval()
    layers = pce_layers(model)
    assert all(m.choice == 'token' and m.balance == 'bias' and m.bias_update_rate == 0.02 for m in layers.values())
    for layer in layers.values():
        layer.balance_bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    args = get_model_args(model)
    assert (args['choice'], args['balance'], args['bias_update_rate']) == ('token', 'bias', 0.02)
    assert args['bias_update'] == 'proportional'
    assert all(m.bias_update == 'proportional' for m in layers.values())
    save_for_hf(model, tmp_path)
    rebuilt = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    for layer in pce_layers(rebuilt).values():
        assert (layer.choice, layer.balance, layer.bias_update_rate) == ('token', 'bias', 0.02)
        assert layer.bias_update == 'proportional'
        assert torch.equal(layer.balance_bias, torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
    expert = timm.create_model('pce_resnet18', choice='expert', pce_stages=(2,), device='meta')
    assert all(m.choice == 'expert' for m in pce_layers(expert).values())
    assert get_model_args(expert)['choice'] == 'expert'
    with pytest.raises(ValueError, match="choice='expert' needs sparse routing"):
        timm.create_model('pce_resnet18', choice='expert', top_k='soft', device='meta')


def test_flags_reach_the_model_and_phases(tmp_path):
    cfg = tiny_args(tmp_path, '--choice', 'expert', '--balance', 'loss', '--bias-update-rate', '0.5',
                    '--bias-update', 'proportional')
    assert {k: model_kwargs(cfg.model)[k] for k in ('choice', 'balance', 'bias_update_rate', 'bias_update')} == {
        'choice': 'expert', 'balance': 'loss', 'bias_update_rate': 0.5, 'bias_update': 'proportional'}
    assert 'choice' not in model_kwargs(tiny_args(tmp_path).model)  # unset: the model's default
    phases = parse_phases([{'name': 'a', 'epochs': 1, 'routing': 'router', 'choice': 'expert'},
                           {'name': 'b', 'routing': 'router'}], epochs=2)
    assert phases[0].choice == 'expert' and phases[1].choice is None
    with pytest.raises(ValueError, match='the last phase overrides balance'):
        parse_phases([{'name': 'a', 'routing': 'router', 'balance': 'bias'}], epochs=1)
    with pytest.raises(ValueError, match=r'phases\[0\]\.choice'):
        parse_phases([{'name': 'a', 'epochs': 1, 'choice': 'patch'}, {'name': 'b'}], epochs=2)
    model = timm.create_model('pce_resnet18', pce_stages=(2,), device='meta')
    controller = PhaseController(model, None, tuple(phases))
    controller.update(0.5)
    assert all(m.choice == 'expert' for m in pce_layers(model).values())
    controller.update(1.5)  # the next phase leaves it unset: the model's own again
    assert all(m.choice == 'token' for m in pce_layers(model).values())


@pytest.mark.parametrize('choice,balance', [('token', 'bias'), ('expert', 'loss')])
def test_training_reports_bias_and_dropped_fraction(tmp_path, choice, balance):
    results = train(tiny_args(tmp_path, '--choice', choice, '--balance', balance, '--bias-update-rate', '0.1',
                              epochs=1, max_train_samples=96, max_eval_samples=64, attention=False, patch_size=2,
                              phases=None))
    written = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert written['routing'] == results['routing']
    for name, layer in results['routing'].items():
        if balance == 'bias':
            assert len(layer['balance_bias']) == 4 and any(b != 0 for b in layer['balance_bias']), name
            assert 'dropped_fraction' not in layer
        else:
            assert 0.0 <= layer['dropped_fraction'] < 1.0 and 'balance_bias' not in layer
            assert layer['imbalance'] == 1.0  # every expert processes the same number of patches
    if choice == 'expert':
        assert 'max_dropped_fraction' in results['routing_summary']
