"""Hub release pipeline: release folders, a push / download round trip through a fake Hub, the offline HF
cache, input errors, offline diagnostics and model cards.

Everything runs offline: the Hub is tests/fake_hub.py on 127.0.0.1, and HF home, cache and token paths point
into tmp_path (the real cache is never touched).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from fake_hub import FakeHub, git_oid, point_huggingface_hub_at
from huggingface_hub import ModelCard, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import RepositoryNotFoundError

from pce_timm.hub import (
    MissingWeightsError,
    ReleaseError,
    check_safetensors,
    install_into_hf_cache,
    load_pretrained_or_explain,
    push_release,
    write_release,
)
from pce_timm.hub import release as release_module
from pce_timm.release import cards as card_data
from pce_timm.release import render
from pce_timm.train.checkpoint import save_model_dir
from pce_timm.utils import atomic_file, atomic_folder, load_module_from_path, write_file_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = 'hf_pceFakeToken0123456789abcdefXYZ'
EXAMPLE_YAML = REPO_ROOT / 'model_cards' / 'example.yaml'
EXAMPLE_REPO = 'pce-timm-example/test_resnet.example_in1k'
TIMM_REPO = 'timm/test_resnet.r160_in1k'  # test_resnet's default cfg hf_hub_id


push_cli = load_module_from_path(REPO_ROOT / 'scripts' / 'push_to_hub.py', 'pce_push_to_hub')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('test_resnet').eval()


@pytest.fixture(scope='module')
def card():
    return render.render_hub_card(card_data.find_entry(card_data.load_entries([EXAMPLE_YAML]), EXAMPLE_REPO))


@pytest.fixture
def release(tmp_path, model, card):
    return write_release(model, tmp_path / 'release', model_card=card, extra_files={'results.json': '{"top1": 1}\n'})


@pytest.fixture
def run_dir(tmp_path, release):
    """A training run folder: model/config.json + model/model.safetensors + results.json."""
    run = tmp_path / 'run'
    (run / 'model').mkdir(parents=True)
    for name in ('config.json', 'model.safetensors'):
        (run / 'model' / name).write_bytes((release / name).read_bytes())
    _write_results(run, top1=58.31, top5=81.07)  # what the example card claims
    return run


def _write_results(run: Path, top1: float, top5: float, split: str = 'validation', **extra) -> Path:
    """A run's results.json (the keys scripts/train.py writes that cards read)."""
    record = {'status': 'completed', 'model': 'test_resnet', 'dataset': 'imagenet-1k', 'eval_split': split,
              'top1': top1, 'top5': top5, 'epochs': 3, 'num_params': 1234, **extra}
    (run / 'results.json').write_text(json.dumps(record) + '\n')
    return run / 'results.json'


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """HF home, hub cache and token paths inside tmp_path, online, no token; returns the hub cache."""
    home = tmp_path / 'hf_home'
    for var in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_HUB_OFFLINE', 'HF_OIDC_RESOURCE', 'HF_ENDPOINT'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_CACHE', str(home / 'hub'))
    monkeypatch.setattr(constants, 'HF_HOME', str(home))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(home / 'hub'))
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(home / 'token'))
    monkeypatch.setattr(constants, 'HF_STORED_TOKENS_PATH', str(home / 'stored_tokens'))
    monkeypatch.setattr(constants, 'AGENT_HARNESSES_PATH', str(home / 'agent_harnesses.json'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    return home / 'hub'


@pytest.fixture
def fake_hub(hf_home, monkeypatch):
    with FakeHub(token=TOKEN) as hub:
        point_huggingface_hub_at(hub, monkeypatch)
        yield hub


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def _assert_token_absent(*folders: Path, texts=()) -> None:
    for folder in folders:
        for path in folder.rglob('*'):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
    for text in texts:
        assert TOKEN not in text


# ---------------------------------------------------------------- release folders

def test_write_release_is_complete_and_deterministic(tmp_path, model, card, release):
    again = write_release(model, tmp_path / 'again', model_card=card, extra_files={'results.json': '{"top1": 1}\n'})
    before = _files(release)
    write_release(model, release, model_card=card, extra_files={'results.json': '{"top1": 1}\n'})  # overwrite
    assert sorted(before) == ['README.md', 'config.json', 'model.safetensors', 'results.json']
    assert _files(again) == before == _files(release)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temp folders left

    config = json.loads((release / 'config.json').read_text())
    assert config['architecture'] == 'test_resnet'
    assert config['num_classes'] == model.num_classes and config['num_features'] == model.num_features
    assert 'num_classes' not in config['model_args']  # top level only: transformers' TimmWrapper passes its own
    assert config['pretrained_cfg']['input_size'] == [3, 160, 160]
    assert (release / 'README.md').read_text() == card
    with open(release / 'model.safetensors', 'rb') as f:  # safetensors framing, no pickle
        assert b'pickle' not in f.read(1 << 16)
    _assert_same_weights(_with_state(safetensors.torch.load_file(release / 'model.safetensors')), model)


def _with_state(state_dict) -> torch.nn.Module:
    fresh = timm.create_model('test_resnet')
    fresh.load_state_dict(state_dict)
    return fresh


def test_failed_write_keeps_previous_release(tmp_path, model, release, monkeypatch):
    before = _files(release)

    def broken(release_dir):
        raise RuntimeError('disk full')
    monkeypatch.setattr(release_module, '_verify_release', broken)
    with pytest.raises(RuntimeError, match='disk full'):
        write_release(model, release, model_card='---\nlicense: mit\n---\nnew card\n')
    assert _files(release) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('.')]

    precious = tmp_path / 'precious'
    precious.mkdir()
    (precious / 'notes.txt').write_text('keep me')
    with pytest.raises(ReleaseError, match='not a release folder'):
        write_release(model, precious, model_card='x')
    with pytest.raises(ReleaseError, match='hidden'):
        write_release(model, tmp_path / 'other', model_card='x', extra_files={'.git/config': 'x'})


def test_atomic_writers_honour_the_umask_and_keep_the_old_on_failure(tmp_path, model):
    old_umask = os.umask(0o027)
    try:
        path = write_file_atomic(tmp_path / 'a' / 'results.json', 'one\n')
        assert path.read_text() == 'one\n' and path.stat().st_mode & 0o777 == 0o640
        write_file_atomic(path, b'two')
        assert path.read_bytes() == b'two'
        with pytest.raises(RuntimeError, match='crash'), atomic_file(path) as tmp:
            tmp.write_text('half')
            raise RuntimeError('crash')
        assert path.read_bytes() == b'two'

        folder = tmp_path / 'folder'
        with atomic_folder(folder) as tmp:
            (tmp / 'x').write_text('1')
        assert (folder / 'x').read_text() == '1' and folder.stat().st_mode & 0o777 == 0o750
        with pytest.raises(RuntimeError, match='crash'), atomic_folder(folder) as tmp:
            (tmp / 'y').write_text('2')
            raise RuntimeError('crash')
        assert sorted(p.name for p in folder.iterdir()) == ['x']
        with atomic_folder(folder) as tmp:
            (tmp / 'y').write_text('2')
        assert sorted(p.name for p in folder.iterdir()) == ['y']

        export = save_model_dir(model, tmp_path / 'run' / 'model')  # a training export: the same writers
        assert export.stat().st_mode & 0o777 == 0o750
        assert (export / 'model.safetensors').stat().st_mode & 0o777 == 0o640
        _assert_same_weights(timm.create_model(f'local-dir:{export}', pretrained=True), model)
    finally:
        os.umask(old_umask)
    hidden = list(tmp_path.rglob('.*'))
    assert not hidden, hidden  # no temporaries or old copies left behind


def test_release_and_training_export_write_the_same_model_files(tmp_path, model, release):
    export = save_model_dir(model, tmp_path / 'export')
    for name in ('config.json', 'model.safetensors'):
        assert (export / name).read_bytes() == (release / name).read_bytes(), name


def test_hub_never_imports_the_models_or_the_layers_above_it():
    """Arrows point down: models -> hub -> (timm, huggingface_hub, pce_timm.utils); no cycle back to models."""
    above = ('pce_timm.models', 'pce_timm.train', 'pce_timm.release', 'pce_timm.analysis', 'pce_timm.data',
             'pce_timm.layers')
    for path in sorted((REPO_ROOT / 'pce_timm' / 'hub').glob('*.py')):
        for imported in _imports(path, 'pce_timm.hub'):
            assert not imported.startswith(above), f'{path.name} imports {imported}'
    assert _imports(REPO_ROOT / 'pce_timm' / 'hub' / 'ids.py', 'pce_timm.hub') == []
    assert _imports(REPO_ROOT / 'pce_timm' / 'utils.py', 'pce_timm') == []


def _imports(path: Path, package: str) -> list:
    """Modules a file imports (absolute names; relative imports resolved against ``package``)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
            found.append(f'{base}.{node.module}' if node.level and node.module else node.module or base)
    return [m for m in found if m.startswith('pce_timm')]


# ---------------------------------------------------------------- push / download through the fake Hub

def test_push_download_and_load_round_trip(tmp_path, fake_hub, hf_home, model, release):
    first = push_release(release, 'pce-test/resnet', token=TOKEN)
    assert first.changed
    assert fake_hub.files('pce-test/resnet').keys() == {'.gitattributes', *_files(release)}
    assert {k: v for k, v in fake_hub.files('pce-test/resnet').items() if k != '.gitattributes'} == _files(release)

    config_path = Path(hf_hub_download('pce-test/resnet', 'config.json'))
    assert config_path.is_relative_to(hf_home) and config_path.read_bytes() == (release / 'config.json').read_bytes()
    _assert_same_weights(timm.create_model('hf-hub:pce-test/resnet', pretrained=True), model)

    commits = len(fake_hub.history('pce-test/resnet'))
    second = push_release(release, 'pce-test/resnet', token=TOKEN)
    assert not second.changed and second.commit_oid == first.commit_oid
    assert len(fake_hub.history('pce-test/resnet')) == commits
    _assert_token_absent(tmp_path)


def test_cli_push_renders_card_and_repush_is_a_noop(tmp_path, fake_hub, run_dir, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    assert push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML)]) == 0
    files = fake_hub.files(EXAMPLE_REPO)
    assert files['results.json'] == (run_dir / 'results.json').read_bytes()
    assert files['model.safetensors'] == (run_dir / 'model' / 'model.safetensors').read_bytes()
    assert ModelCard(files['README.md'].decode()).data.model_name == 'test_resnet.example_in1k'
    commits = len(fake_hub.history(EXAMPLE_REPO))

    assert push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML)]) == 0
    assert len(fake_hub.history(EXAMPLE_REPO)) == commits
    out = capsys.readouterr()
    assert 'unchanged' in out.out
    _assert_token_absent(tmp_path, texts=[out.out, out.err, *(f.decode('latin-1') for f in files.values())])


def test_cli_push_to_an_unreachable_hub_exits_1(tmp_path, hf_home, run_dir, monkeypatch, capsys):
    """A connection failure (the HTTP client's own error, not an HfHubHTTPError) is a message and exit 1."""
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    assert push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'error: pushing to {EXAMPLE_REPO!r} failed: ') and TOKEN not in err


def test_card_for_a_checkpoint_of_another_architecture_is_refused():
    with pytest.raises(card_data.CardDataError, match="describes 'test_resnet' but the checkpoint is a 'resnet18'"):
        render.card_for_checkpoint(EXAMPLE_REPO, 'resnet18', [EXAMPLE_YAML])
    card, assets, found = render.card_for_checkpoint('org/unknown', 'resnet18', [EXAMPLE_YAML], allow_minimal=True)
    assert not found and assets == {} and "timm.create_model('hf-hub:org/unknown', pretrained=True)" in card
    with pytest.raises(card_data.CardDataError, match="no model card entry with repo_id 'org/unknown'"):
        render.card_for_checkpoint('org/unknown', 'resnet18', [EXAMPLE_YAML])


# ---------------------------------------------------------------- offline HF cache

def test_install_into_hf_cache_loads_offline(tmp_path, hf_home, model, release, monkeypatch):
    snapshot = install_into_hf_cache(release, TIMM_REPO)
    storage = snapshot.parent.parent
    layout = {p.relative_to(storage).as_posix(): os.readlink(p) if p.is_symlink() else p.read_bytes()
              for p in sorted(storage.rglob('*')) if p.is_file() or p.is_symlink()}
    assert install_into_hf_cache(release, TIMM_REPO) == snapshot  # idempotent
    assert {p.relative_to(storage).as_posix(): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(storage.rglob('*')) if p.is_file() or p.is_symlink()} == layout
    assert storage == hf_home / 'models--timm--test_resnet.r160_in1k'
    assert (storage / 'refs' / 'main').read_text() == snapshot.name  # no trailing newline
    blob_names = {p.name for p in (storage / 'blobs').iterdir()}
    assert git_oid((release / 'config.json').read_bytes()) in blob_names  # regular file: git blob sha1
    assert hashlib.sha256((release / 'model.safetensors').read_bytes()).hexdigest() in blob_names  # LFS: sha256
    for name, data in _files(release).items():
        assert (snapshot / name).is_symlink() and (snapshot / name).read_bytes() == data

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert Path(hf_hub_download(TIMM_REPO, 'config.json')) == snapshot / 'config.json'
    _assert_same_weights(timm.create_model(f'hf-hub:{TIMM_REPO}', pretrained=True), model)
    _assert_same_weights(timm.create_model('test_resnet.r160_in1k', pretrained=True), model)
    _assert_same_weights(load_pretrained_or_explain('test_resnet.r160_in1k'), model)
    _assert_same_weights(timm.create_model(f'local-dir:{release}', pretrained=True), model)

    cache_info = scan_cache_dir(hf_home)
    assert not cache_info.warnings
    (repo,) = cache_info.repos
    assert repo.repo_id == TIMM_REPO and set(repo.refs) == {'main'} and repo.nb_files == len(_files(release))


def test_missing_weights_offline_are_explained(hf_home, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(MissingWeightsError) as info:
        load_pretrained_or_explain('hf-hub:pce-timm/pce_missing.in1k')
    message = str(info.value)
    assert "'pce-timm/pce_missing.in1k'" in message and "revision 'main'" in message
    assert str(hf_home / 'models--pce-timm--pce_missing.in1k') in message
    assert 'HF_HUB_OFFLINE' in message and 'push_to_hub.py' in message and '--install-cache' in message

    with pytest.raises(MissingWeightsError, match=r"timm/test_resnet\.r160_in1k.*nothing for it"):
        load_pretrained_or_explain('test_resnet.r160_in1k')


# ---------------------------------------------------------------- bad inputs: a message and exit code 2

def _truncate(run_dir: Path) -> str:
    weights = run_dir / 'model' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:100_000])
    return r'model\.safetensors: truncated'


def _garble(run_dir: Path) -> str:
    (run_dir / 'model' / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}')
    return r'model\.safetensors: corrupt safetensors header'


def _wrong_num_classes(run_dir: Path) -> str:
    path = run_dir / 'model' / 'config.json'
    config = json.loads(path.read_text())
    config['num_classes'] = config['pretrained_cfg']['num_classes'] = 10
    path.write_text(json.dumps(config))
    return r'(?s)num_classes=10.*shape mismatch: fc\.bias: checkpoint \(1000,\) vs model \(10,\)'


def _drop_tensor(run_dir: Path) -> str:
    path = run_dir / 'model' / 'model.safetensors'
    tensors = safetensors.torch.load_file(path)
    del tensors['fc.weight']
    safetensors.torch.save_file(tensors, path)
    return r'missing keys: fc\.weight'


def _missing_input(run_dir: Path) -> str:
    shutil.rmtree(run_dir)
    return r'no such file or directory'


@pytest.mark.parametrize('damage', [_truncate, _garble, _wrong_num_classes, _drop_tensor, _missing_input])
def test_bad_input_is_a_clear_error(tmp_path, run_dir, damage, capsys):
    pattern = damage(run_dir)
    code = push_cli.main([str(run_dir), '--repo-id', 'org/name', '--dry-run', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: ')
    assert re.search(pattern, err), err
    assert not (tmp_path / 'out').exists()


def test_check_safetensors_accepts_a_good_file(release, model):
    header = check_safetensors(release / 'model.safetensors')
    assert header['fc.weight']['shape'] == tuple(model.fc.weight.shape)


def test_real_push_without_token_is_refused(hf_home, run_dir, capsys):
    assert push_cli.main([str(run_dir), '--repo-id', 'org/name']) == 2
    assert 'no Hugging Face token' in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s of CPU
def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'scripts' / 'push_to_hub.py'), str(tmp_path / 'nope'), '--repo-id', 'a/b',
         '--dry-run', str(tmp_path / 'out')],
        capture_output=True, text=True, timeout=120, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert result.returncode == 2
    assert result.stderr.startswith('error: ') and 'Traceback' not in result.stderr


# ---------------------------------------------------------------- model cards

def test_hub_card_metadata_and_body(card):
    parsed = ModelCard(card)
    data = parsed.data
    assert data.library_name == 'timm' and data.license == 'apache-2.0'
    assert set(render.BASE_TAGS) <= set(data.tags) and data.datasets == ['imagenet-1k']
    assert data.pipeline_tag == 'image-classification' and data.metrics == ['accuracy']
    top1 = next(r for r in data.eval_results if r.metric_type == 'accuracy')
    assert top1.metric_value == pytest.approx(58.31) and top1.dataset_split == 'validation'
    assert f"timm.create_model('hf-hub:{EXAMPLE_REPO}', pretrained=True)" in parsed.text
    assert '| ImageNet-1k | validation | 160 | 58.31 | 81.07 |' in parsed.text
    entry = card_data.find_entry(card_data.load_entries([EXAMPLE_YAML]), EXAMPLE_REPO)
    numbers = [entry.params_m, entry.gmacs] + [m for r in entry.results for m in (r.top1, r.top5, *r.routing.values())]
    for measured in numbers:
        assert f'`{measured.command}`' in parsed.text


def _family(tmp_path: Path, edit=None) -> Path:
    data = yaml.safe_load(EXAMPLE_YAML.read_text())
    data['readme'] = True
    if edit:
        edit(data)
    path = tmp_path / 'family.yaml'
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_card_data_needs_a_command_for_every_number(tmp_path):
    def bare_number(data):
        data['models'][0]['results'][0]['top1'] = 58.31
    with pytest.raises(card_data.CardDataError, match=r'results\[0\]\.top1: a number needs the command'):
        card_data.load_entries([_family(tmp_path, bare_number)])

    def typo(data):
        data['models'][0]['parmas_m'] = data['models'][0].pop('params_m')
    with pytest.raises(card_data.CardDataError, match='unknown field.*parmas_m'):
        card_data.load_entries([_family(tmp_path, typo)])


def _unmeasured(data):
    """The example entry as a recipe that has not run yet: no numbers, no training command."""
    entry = data['models'][0]
    for key in ('params_m', 'gmacs'):
        entry.pop(key)
    for key in ('top1', 'top5', 'img_size', 'routing'):
        entry['results'][0].pop(key)
    entry['training'].pop('command')


def test_an_entry_without_numbers_is_not_measured_yet_until_they_are_written(tmp_path):
    path = _family(tmp_path, _unmeasured)
    assert card_data.load_entries([path]) == []  # checked, but in no table and no card
    assert render.render_model_table(card_data.load_entries([path])) == '_No released models yet._'
    measured = card_data.Measured
    numbers = card_data.CardNumbers(
        name='test_resnet.example_in1k', baseline=False, params_m=measured(0.47, 'python p'),
        gmacs=measured(0.1, 'python g'), top1=measured(60.5, 'python e'), top5=measured(82.0, 'python e'),
        img_size=160, train_command='python scripts/train.py', train_time='1.0 min')
    card_data.update_measured(path, [numbers])
    [entry] = card_data.load_entries([path])
    assert entry.params_m.value == 0.47 and entry.results[0].top1.value == 60.5 and entry.results[0].img_size == 160
    assert entry.training['command'] == 'python scripts/train.py'

    def half_measured(data):
        _unmeasured(data)
        data['models'][0]['params_m'] = {'value': 0.47, 'command': 'python p'}
    with pytest.raises(card_data.CardDataError, match=r'models\[0\]: missing field\(s\) gmacs'):
        card_data.load_entries([_family(tmp_path, half_measured)])

    def typo(data):
        _unmeasured(data)
        data['models'][0]['sumary'] = data['models'][0].pop('summary')
    with pytest.raises(card_data.CardDataError, match='unknown field.*sumary'):
        card_data.load_entries([_family(tmp_path, typo)])


def test_readme_table_check_and_write(tmp_path, capsys):
    figure = tmp_path / 'routing.png'
    figure.write_bytes(b'\x89PNG\r\n\x1a\n')

    def with_figure(data):
        data['models'][0]['routing_figure'] = 'routing.png'
    cards = _family(tmp_path, with_figure)
    readme = tmp_path / 'README.md'
    readme.write_text('# pce_timm\n\n<!-- model-table:start -->\nold table\n<!-- model-table:end -->\n\nMore.\n')
    args = ['--readme', str(readme), '--cards', str(cards)]
    assert render.main(['--check', *args]) == 1
    assert render.main(['--write', *args]) == 0
    assert render.main(['--check', *args]) == 0
    text = readme.read_text()
    assert text.startswith('# pce_timm\n\n<!-- model-table:start -->\n| Model |') and text.endswith('\n\nMore.\n')
    assert f'[test_resnet.example_in1k](https://huggingface.co/{EXAMPLE_REPO})' in text and '| 58.31 |' in text

    entry = card_data.load_entries([cards])[0]
    assert render.card_assets(entry) == {'figures/routing.png': figure}
    assert '](figures/routing.png)' in render.render_hub_card(entry)

    readme.write_text('# no markers\n')
    assert render.main(['--check', *args]) == 2
    assert 'model-table:start' in capsys.readouterr().err


def test_push_to_a_branch_of_a_private_repo(fake_hub, release):
    result = push_release(release, 'pce-test/private', token=TOKEN, revision='v1', private=True)
    assert result.changed and result.revision == 'v1'
    assert fake_hub.repos['pce-test/private'].private
    assert 'model.safetensors' in fake_hub.files('pce-test/private', 'v1')
    assert 'model.safetensors' not in fake_hub.files('pce-test/private', 'main')
    assert not push_release(release, 'pce-test/private', token=TOKEN, revision='v1').changed
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download('pce-test/private', 'config.json', revision='v1', token=False)


# ---------------------------------------------------------------- what a pushed card may claim (issue 15)

def test_push_refuses_a_card_its_weights_do_not_support(tmp_path, run_dir, capsys):
    _write_results(run_dir, top1=11.7, top5=52.0)  # a 1-epoch run pushed under the release's repo id
    code = push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML),
                          '--dry-run', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: refusing to publish a card that its weights do not support')
    assert 'claims top-1 58.31, top-5 81.07 on ImageNet-1k validation' in err
    assert 'give top-1 11.70, top-5 52.00 on imagenet-1k/validation' in err
    assert not (tmp_path / 'out').exists()


def test_a_fresh_evaluation_next_to_the_weights_is_what_counts(tmp_path, run_dir, capsys):
    _write_results(run_dir, top1=11.7, top5=52.0)
    evaluation = {'dataset': 'imagenet-1k', 'split': 'validation', 'top1': 58.312, 'top5': 81.07}
    (run_dir / 'eval-imagenet-1k-validation.json').write_text(json.dumps(evaluation))  # scripts/evaluate.py
    assert push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML),
                          '--dry-run', str(tmp_path / 'out')]) == 0
    assert (tmp_path / 'out' / 'eval-imagenet-1k-validation.json').is_file()


@pytest.mark.parametrize('split', ['train', None])
def test_push_without_an_evaluation_on_the_cards_split_is_refused(tmp_path, run_dir, split, capsys):
    if split is None:
        (run_dir / 'results.json').unlink()
    else:
        _write_results(run_dir, top1=58.31, top5=81.07, split=split)
    code = push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML),
                          '--dry-run', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and 'have no evaluation there' in err and 'scripts/evaluate.py' in err
    assert ('on imagenet-1k/train' in err) if split else ('none (no results.json' in err)


def test_a_run_without_a_card_entry_gets_a_card_from_its_own_results(tmp_path, run_dir, capsys):
    routing = {'layer3.0.conv1': {'usage_entropy': 0.98, 'imbalance': 1.31, 'dead_experts': []}}
    config = {'model': 'test_resnet', 'dataset': 'imagenet-1k', 'epochs': 3, 'lr': 0.004, 'num_experts': 4}
    _write_results(run_dir, top1=71.25, top5=90.5, routing=routing, config=config)
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(config))
    assert push_cli.main([str(run_dir), '--repo-id', 'someone/my-finetune', '--dry-run', str(tmp_path / 'out')]) == 0
    assert "writing a card from the run's results.json" in capsys.readouterr().err
    card = ModelCard((tmp_path / 'out' / 'README.md').read_text())
    (result,) = [r for r in card.data.eval_results if r.metric_type == 'accuracy']
    assert result.metric_value == 71.25 and result.dataset_split == 'validation'
    assert '| imagenet-1k | validation | 71.25 | 90.50 | 3 | 1,234 |' in card.text
    assert '| layer3.0.conv1 | 0.980 | 1.310 | 0 |' in card.text
    assert '| lr | `0.004` |' in card.text and 'No model card data yet' not in card.text
    assert (tmp_path / 'out' / 'config.yaml').read_text() == (run_dir / 'config.yaml').read_text()


def test_non_finite_weights_are_never_released(tmp_path, run_dir, model, card, capsys):
    path = run_dir / 'model' / 'model.safetensors'
    tensors = safetensors.torch.load_file(path)
    tensors['fc.weight'][0, :3] = torch.tensor([float('nan'), float('inf'), 1.0])
    safetensors.torch.save_file(tensors, path)
    code = push_cli.main([str(run_dir), '--repo-id', EXAMPLE_REPO, '--cards', str(EXAMPLE_YAML),
                          '--dry-run', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and 'weights hold NaN / inf values in fc.weight (2)' in err and not (tmp_path / 'out').exists()

    broken = timm.create_model('test_resnet')
    with torch.no_grad():
        broken.fc.bias.fill_(float('nan'))
    with pytest.raises(ReleaseError, match=r'NaN / inf values in fc\.bias \(\d+\)'):
        write_release(broken, tmp_path / 'broken', model_card=card)
    assert not (tmp_path / 'broken').exists()


def test_install_replaces_a_corrupted_blob_of_the_same_size(tmp_path, hf_home, model, release, monkeypatch):
    snapshot = install_into_hf_cache(release, TIMM_REPO)
    blob = (snapshot / 'model.safetensors').resolve()
    data = bytearray(blob.read_bytes())
    data[-8:] = b'\xff' * 8  # the last weights' bytes: NaNs, the size unchanged
    blob.write_bytes(bytes(data))
    assert install_into_hf_cache(release, TIMM_REPO) == snapshot
    assert blob.read_bytes() == (release / 'model.safetensors').read_bytes()
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    _assert_same_weights(timm.create_model(f'hf-hub:{TIMM_REPO}', pretrained=True), model)
