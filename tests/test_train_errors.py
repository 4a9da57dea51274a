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


# ---------------------------------------------------------------------------------------------------------
# every error clear: model arguments, model sources and folders, data, surgery (issue 15)

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ['--stem-type', 'cifar', '--pce-stages', '1', '--model-kwargs', 'channels=[8,16,32,64]']


@pytest.mark.parametrize('extra, message', [
    (['--patch-size', '1000'], r"patch_size: 1000 is larger than the map these PCE layers route at the run's 8x8 px "
                               r'input: layer3\.0\.conv1 \(1000x1000 px patches of a 1x1 px map\).*no patch_size fits'),
    (SMALL + ['--patch-size', '5'], r'patch_size: 5 is larger .* layer2\.0\.conv1 \(5x5 px patches of a 4x4 px map\)'
                                    r'.*accepted: a patch_size of at most 4 px'),
    (['--top-k', '9'], r'model: pce_resnet18 cannot be built with top_k=9: top_k must be None or in '
                       r'1\.\.num_experts=4, got 9\. Fix or drop'),
    (['--model-kwargs', 'foo=1'], r"cannot be built with foo=1: PCEResNet.__init__\(\) got an unexpected keyword "
                                  r"argument 'foo'"),
    (['--model-kwargs', 'router=nope'], r"cannot be built with router='nope': router must be one of"),
    (['--model', 'resnet18', '--model-kwargs', 'foo=1'], r'model: resnet18 cannot be built with foo=1'),
    (['--model', 'runs/no-such-run'], r"model: runs/no-such-run: no such run, model or checkpoint folder\. .*"
                                      r'hf-hub:runs/no-such-run for a Hugging Face Hub repo'),
])
def test_bad_model_arguments_fail_at_parse_time(extra, message):
    with pytest.raises(RecipeError, match=message):
        parse_args(BASE + extra)


def test_a_patch_that_fits_passes():
    assert parse_args(BASE + SMALL + ['--patch-size', '4']).model.patch_size == 4


def test_bad_flag_values_are_one_error_line(capsys):
    for extra, message in ((['--model-kwargs', 'foo'], "argument --model-kwargs: expected KEY=VALUE"),
                           (['--top-k', 'x'], "argument --top-k: expected an integer k or 'soft', got 'x'")):
        with pytest.raises(SystemExit) as info:
            parse_args(BASE + extra)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f'error: {message}') and err.count('\n') == 1, err


@pytest.fixture(scope='module')
def model_folders(tmp_path_factory):
    """A good model folder and five broken copies of it."""
    import shutil

    import timm

    from pce_timm.train.checkpoint import save_model_dir

    root = tmp_path_factory.mktemp('folders')
    model = timm.create_model('pce_resnet18', num_classes=10, in_chans=1, stem_type='cifar', pce_stages=(1,),
                              channels=[8, 16, 32, 64])
    good = save_model_dir(model, root / 'good')
    for name in ('truncated', 'shape', 'json', 'arch', 'noweights'):
        shutil.copytree(good, root / name)
    weights = root / 'truncated' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((good / 'config.json').read_text())
    (root / 'shape' / 'config.json').write_text(json.dumps({**config, 'num_classes': 7}))
    (root / 'json' / 'config.json').write_text('{"architecture": "pce_resnet18", ')
    (root / 'arch' / 'config.json').write_text(json.dumps({**config, 'architecture': 'pce_resnet81'}))
    (root / 'noweights' / 'model.safetensors').unlink()
    return root


FOLDER_ERRORS = [
    ('truncated', r'truncated/model\.safetensors: truncated: the header promises \d+ bytes .* Re-export or '
                  r're-download it'),
    ('shape', r'model\.safetensors does not fit .*shape/config\.json .*num_classes=7.*\n  shape mismatch: fc\.bias'),
    ('json', r'json/config\.json: not valid JSON'),
    ('arch', r"arch/config\.json: architecture 'pce_resnet81' is not a registered timm model"),
    ('noweights', r'noweights/model\.safetensors: missing'),
]


@pytest.mark.parametrize('name, message', FOLDER_ERRORS)
def test_broken_model_folders_name_the_file(model_folders, name, message):
    """What scripts/evaluate.py and finetune.py load through (load_model), and train.py checks at parse time."""
    from pce_timm.hub import ReleaseError
    from pce_timm.train.models import load_model

    for source in (str(model_folders / name), f'local-dir:{model_folders / name}'):
        with pytest.raises(ReleaseError, match=message):
            load_model(source)
        with pytest.raises(ReleaseError, match=message):
            parse_args(BASE + ['--model', source])


@pytest.mark.parametrize('name, message', [e for e in FOLDER_ERRORS if e[0] in ('truncated', 'shape')])
def test_create_model_local_dir_names_the_file(model_folders, name, message):
    """timm.create_model('local-dir:...') itself: weights that do not load say which file and why. (Invalid JSON
    and an unknown architecture fail inside timm's own config reader, before any pce_timm code runs.)"""
    import timm

    from pce_timm.hub import ReleaseError

    with pytest.raises(ReleaseError, match=message):
        timm.create_model(f'local-dir:{model_folders / name}', pretrained=True)


def test_good_model_folder_loads_and_a_missing_one_is_named(model_folders):
    from pce_timm.train.models import ModelSourceError, load_model

    assert load_model(str(model_folders / 'good'), num_classes=3).num_classes == 3  # a new classifier is fine
    with pytest.raises(ModelSourceError, match=r'runs/gone: no such run, model or checkpoint folder'):
        load_model('runs/gone')
    with pytest.raises(ModelSourceError, match=r'not a model folder .* a run that did not finish has no model/'):
        load_model(str(model_folders))


def _cli(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), HF_HUB_OFFLINE='1')
    return subprocess.run([sys.executable, str(ROOT / 'scripts' / script), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_errors_are_one_line_with_their_exit_code(model_folders):
    done = _cli('evaluate.py', '--model', str(model_folders / 'truncated'), '--dataset', 'digits')
    assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'model.safetensors: truncated' in lines[0]


def test_batch_larger_than_the_data_is_a_recipe_error():
    from pce_timm.train.data import DataBundle, build_loaders, load_data

    cfg = parse_args(BASE + SMALL + ['--max-train-samples', '10', '--batch-size', '32'])
    bundle = load_data(cfg.data)
    with pytest.raises(RecipeError, match=r'batch_size: 32 is larger than the 10 training samples .* lower '
                                          r'--batch-size or raise --max-train-samples'):
        build_loaders(cfg.data, cfg.augment, bundle, cfg.seed)
    assert isinstance(bundle, DataBundle)


def test_an_image_that_does_not_decode_is_named(tmp_path):
    import numpy as np
    from PIL import Image

    from pce_timm.data import ImageClassificationDataset, ImageReadError, load_image_dataset
    from pce_timm.train.data import SeededAugmentDataset

    for split in ('train', 'test'):
        for label in range(10):
            folder = tmp_path / split / str(label)
            folder.mkdir(parents=True)
            Image.fromarray(np.full((28, 28), 20 * label, dtype=np.uint8)).save(folder / 'a.png')
    broken = tmp_path / 'train' / '3' / 'a.png'
    broken.write_bytes(broken.read_bytes()[:40])
    dataset = load_image_dataset('mnist', 'train', str(tmp_path))
    row = dataset['label'].index(3)
    message = rf'cannot read image file {broken}: \w+Error: .*replace it with a readable copy or remove it'
    with pytest.raises(ImageReadError, match=message):
        ImageClassificationDataset(dataset)[row]
    with pytest.raises(ImageReadError, match=message):
        SeededAugmentDataset(dataset, None).__getitems__(list(range(len(dataset))))
    assert ImageClassificationDataset(dataset)[(row + 1) % len(dataset)][0].size == (28, 28)


def test_bad_surgery_requests_are_refused_before_any_work():
    import timm

    from pce_timm.analysis.surgery import SurgeryError, check_surgery

    model = timm.create_model('pce_resnet18', num_classes=10, in_chans=1, stem_type='cifar', pce_stages=(1,),
                              channels=[8, 16, 32, 64])
    check_surgery(model, keep=[('layer2.0.conv1', [0, 2])], reinforce=['layer2.1.conv1'])
    for kwargs, message in (
            (dict(keep=[('layer9.0.conv1', [0])]), r'--keep names unknown PCE layers layer9\.0\.conv1; the PCE '
                                                   r'layers of this model are layer2\.0\.conv1, layer2\.1\.conv1'),
            (dict(keep=[('layer2.0.conv1', [0, 7])]), r'--keep layer2\.0\.conv1=0,7: .*its experts are 0\.\.3'),
            (dict(keep=[('layer2.0.conv1', [0]), ('layer2.0.conv1', [1])]), r'names layer2\.0\.conv1 more than once'),
            (dict(reinforce=['layer9']), r'--reinforce names unknown PCE layers layer9'),
    ):
        with pytest.raises(SurgeryError, match=message):
            check_surgery(model, **kwargs)
    with pytest.raises(SurgeryError, match='needs a PCEResNet'):
        check_surgery(timm.create_model('resnet18'), keep=[('layer1.0.conv1', [0])])


@pytest.mark.parametrize('script', ['train.py', 'finetune.py', 'evaluate.py', 'surgery.py', 'analyze_routing.py',
                                    'sweep.py', 'evaluate_dense.py', 'train_detection.py', 'train_segmentation.py',
                                    'make_dense_dataset.py', 'push_to_hub.py', 'demo.py', 'make_release.py',
                                    'export.py', 'benchmark.py', 'balance_table.py'])
def test_help_imports_no_torch(script):
    """--help builds the same parser from pce_timm/train/flags.py alone (scripts/_fast_help.py): no torch, timm or
    accelerate import (python -X importtime lists every module imported)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS='120')
    done = subprocess.run([sys.executable, '-X', 'importtime', str(ROOT / 'scripts' / script), '--help'], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith('usage: '), done.stderr[-2000:]
    imported = {line.rsplit('|', 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith('import time')}
    assert not imported & {'torch', 'timm', 'accelerate', 'pce_timm'}, sorted(imported & {'torch', 'timm'})
    if script in ('train.py', 'finetune.py'):  # the options are train.py's own
        from pce_timm.train import build_parser

        flags = {o for a in build_parser()._actions for o in a.option_strings}
        assert all(flag in done.stdout for flag in flags)
    if script == 'train_detection.py':
        assert '--arch {fasterrcnn,retinanet,fcos}' in done.stdout and '--fpn-channels' in done.stdout


def test_light_parsers_name_what_the_library_accepts():
    """The choices the torch-free parsers write out are the library's own."""
    from pce_timm import export
    from pce_timm.tasks import DETECTION_ARCHS, SEGMENTATION_ARCHS
    from pce_timm.train import flags
    from pce_timm.utils import load_module_from_path

    script = load_module_from_path(ROOT / 'scripts' / 'export.py', 'pce_export_script')
    assert (script.FORMATS, script.ONNX_EXPORTERS) == (export.FORMATS, export.ONNX_EXPORTERS)
    assert flags.DETECTION_ARCHS == DETECTION_ARCHS
    assert flags.SEGMENTATION_ARCH_NAMES == tuple(SEGMENTATION_ARCHS)


def test_an_error_from_a_loader_worker_is_one_line(tmp_path, capsys):
    """torch re-raises a worker's exception with the worker's traceback in its message; run_cli prints the message."""
    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from pce_timm.data import ImageClassificationDataset, load_image_dataset
    from pce_timm.train.cli import run_cli

    for split in ('train', 'test'):
        for label in range(10):
            (tmp_path / split / str(label)).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / split / str(label) / 'a.png')
    (tmp_path / 'train' / '0' / 'a.png').write_bytes(b'not an image')
    dataset = ImageClassificationDataset(load_image_dataset('mnist', 'train', str(tmp_path)))
    loader = DataLoader(dataset, batch_size=10, num_workers=1)
    capsys.readouterr()  # datasets' progress lines
    assert run_cli(lambda: next(iter(loader))) == 3
    err = capsys.readouterr().err.strip().splitlines()
    path = tmp_path / 'train' / '0' / 'a.png'
    assert err == [f'error: cannot read image file {path}: UnidentifiedImageError: cannot identify image file '
                   f"'{path}'. It is truncated, corrupt or not an image: replace it with a readable copy or "
                   'remove it from the dataset, then run again.'], err
