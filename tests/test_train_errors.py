"""Bad names on the training command line are one clear error each, before any data is loaded (issue 15)."""
import pytest

from pce_timm.train import RecipeError, parse_args

BASE = ['--model', 'pce_resnet18', '--dataset', 'digits', '--output-dir', 'unused']


@pytest.mark.parametrize('extra, message', [
    (['--model', 'pce_resnet81'], r"model: 'pce_resnet81' is not a timm model\. Did you mean pce_resnet18"),
    (['--model', 'local-dir:/nonexistent'], r'/nonexistent holds no config\.json'),
    (['--model', '/'], r'model: /: not a model folder'),
    (['--dataset', 'fashion-mnst'], r"dataset: 'fashion-mnst' is not a dataset pce_timm knows; accepted: fashion"),
    (['--opt', 'adamx'], r"opt: 'adamx' is not a timm optimizer \(did you mean adamax"),
    (['--sched', 'cosnie'], r"sched: 'cosnie': Unknown scheduler 'cosnie'\. Accepted: none, cosine"),
    (['--num-experts', '4', '--top-k', '9'], r'top_k: 9 is more than num_experts=4; accepted: 1\.\.4 or soft'),
])
def test_bad_names_are_clear_errors(extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_args(BASE + extra)


@pytest.mark.parametrize('extra', [[], ['--opt', 'lookahead_adamw'], ['--sched', 'none'], ['--model', 'resnet18'],
                                   ['--model', 'pce_resnet18.fmnist'], ['--top-k', 'soft', '--num-experts', '2']])
def test_good_names_pass(extra):
    parse_args(BASE + extra)


def _finished_run(tmp_path):
    from pce_timm.train import train

    run = tmp_path / 'run'
    train(parse_args(['--model', 'pce_resnet18', '--dataset', 'digits', '--stem-type', 'cifar', '--pce-stages', '1',
                      '--epochs', '1', '--max-train-samples', '64', '--max-eval-samples', '32', '--batch-size', '32',
                      '--model-kwargs', 'channels=[8,16,32,64]', '--output-dir', str(run), '--progress', 'false']))
    return run


@pytest.mark.usefixtures('one_thread_fresh_accelerate')
def test_resume_keeps_the_recipe_but_may_run_longer(tmp_path):
    from accelerate.state import AcceleratorState

    from pce_timm.train import train

    run = _finished_run(tmp_path)
    with pytest.raises(RecipeError, match=r'resume: the run in .* was trained with other settings than these: lr '
                                          r'\(0\.001 in the run, 0\.05 now\); top_k \(None in the run, 2 now\)'):
        parse_args(['--output-dir', str(run), '--resume', 'auto', '--lr', '0.05', '--top-k', '2'])
    AcceleratorState._reset_state(True)
    results = train(parse_args(['--output-dir', str(run), '--resume', 'auto', '--epochs', '2', '--progress', 'false']))
    assert results['epochs'] == 2 and [h['epoch'] for h in results['history']] == [1, 2]


def test_tables_print_no_negative_zero():
    from pce_timm.train.evaluation import format_table

    row = format_table([[-0.0, -0.0004, -0.5]], ['a', 'b', 'c']).splitlines()[-1]
    assert row.split() == ['0.000', '0.000', '-0.500']


def test_results_json_has_no_negative_zero(tmp_path):
    import json

    from pce_timm.train.checkpoint import write_json_atomic

    path = write_json_atomic({'loss': -0.0, 'history': [{'aux': -0.0, 'top1': 1.0}]}, tmp_path / 'r.json')
    assert '-0.0' not in path.read_text() and json.loads(path.read_text())['history'][0]['aux'] == 0.0
