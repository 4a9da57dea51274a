"""Nothing lost (issue 15): kills while saving, corrupt checkpoints, NaN / inf states, two runs on one folder, a
full or read-only disk, the umask. Tiny real runs on the bundled digits (one torch thread, seconds each)."""
import errno
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_train import tiny_args
from torch.optim.optimizer import register_optimizer_step_post_hook

from pce_timm.train import NonFiniteLossError, train
from pce_timm.train.checkpoint import is_complete
from pce_timm.train.cli import run_cli
from pce_timm.train.engine import Criterion
from pce_timm.train.lock import RunLock, RunLockedError
from pce_timm.train.trainer import _setup

pytestmark = pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py

# 64 images in batches of 16: 4 updates an epoch; one phase, no attention
FAST = dict(epochs=1, max_train_samples=64, batch_size=16, max_eval_samples=32, attention=False, phases=None,
            key_init_batches=1)


def fast_args(tmp_path, *extra, **overrides):
    return tiny_args(tmp_path, *extra, **{**FAST, **overrides})


def _fresh_state():
    AcceleratorState._reset_state(True)


def _checkpoints(run):
    return sorted((run / 'checkpoints').iterdir(), key=lambda p: int(p.name.rpartition('_')[2]))


class Killed(BaseException):
    """Stands for a kill -9 in the middle of a save: nothing after it runs (no cleanup catches it)."""


def _kill_at_save(monkeypatch, number):
    """The ``number``-th save_state of this process dies after the model and optimizer files are written."""
    import accelerate.accelerator

    original, calls = accelerate.accelerator.save_custom_state, {'n': 0}

    def save_custom_state(obj, path, index=0, **kwargs):
        calls['n'] += 1
        if calls['n'] == number:
            raise Killed(path)
        return original(obj, path, index, **kwargs)

    monkeypatch.setattr(accelerate.accelerator, 'save_custom_state', save_custom_state)


# ---------------------------------------------------------------------------------------------------------
# 1. rotation: a kill while saving never leaves the run without a complete checkpoint


@pytest.mark.parametrize('limit', [1, 2])
def test_kill_during_a_save_keeps_a_complete_checkpoint(tmp_path, monkeypatch, capsys, limit):
    args = ['--checkpoint-steps', '1', '--checkpoint-limit', str(limit)]
    _kill_at_save(monkeypatch, 3)  # checkpoint_2: accelerate's total_limit deleted the older ones first
    with pytest.raises(Killed):
        train(fast_args(tmp_path, *args, epochs=2))
    run = tmp_path / 'run'
    complete = [p.name for p in _checkpoints(run) if is_complete(p)]
    assert complete[-1:] == ['checkpoint_1'] and len(complete) <= limit + 1, complete
    assert not is_complete(run / 'checkpoints' / 'checkpoint_2')

    if limit == 2:  # a resumed run killed at its first save: the one it resumed from must survive that too
        _fresh_state()
        _kill_at_save(monkeypatch, 1)
        with pytest.raises(Killed):
            train(fast_args(tmp_path, *args, '--resume', 'auto', epochs=2))
        assert is_complete(run / 'checkpoints' / 'checkpoint_1')

    monkeypatch.undo()
    _fresh_state()
    capsys.readouterr()
    results = train(fast_args(tmp_path, *args, '--resume', 'auto', epochs=2))
    out = capsys.readouterr().out
    assert f'resumed from {run / "checkpoints" / "checkpoint_1"}: epoch 0, batch 2, update 2' in out
    assert f'removed {run / "checkpoints" / "checkpoint_2"}' in out  # the half-written one
    assert results['updates'] == 8
    kept = _checkpoints(run)
    assert len(kept) == limit and all(is_complete(p) for p in kept)

    if limit == 1:  # the resumed run is the uninterrupted one
        _fresh_state()
        (tmp_path / 'ref').mkdir()
        reference = train(fast_args(tmp_path / 'ref', *args, epochs=2))
        a = load_file(str(tmp_path / 'ref' / 'run' / 'model' / 'model.safetensors'))
        b = load_file(str(run / 'model' / 'model.safetensors'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert [h['train_loss'] for h in results['history']] == [h['train_loss'] for h in reference['history']]


# ---------------------------------------------------------------------------------------------------------
# 2. --resume auto passes a corrupt newest checkpoint by, saying which file


@pytest.fixture(scope='module')
def two_checkpoints(tmp_path_factory):
    """A finished 1-epoch run with checkpoint_0 (update 2, mid-epoch) and checkpoint_1 (update 4), written under
    umask 002 (test_files_honour_the_umask reads their modes)."""
    tmp = tmp_path_factory.mktemp('faults')
    AcceleratorState._reset_state(True)
    threads, umask = torch.get_num_threads(), os.umask(0o002)
    torch.set_num_threads(1)
    try:
        train(fast_args(tmp, '--checkpoint-steps', '2'))
    finally:
        os.umask(umask)
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
    return tmp / 'run'


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _zero(path):
    path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize('name, damage', [
    ('model.safetensors', _truncate), ('optimizer.bin', _truncate), ('random_states_0.pkl', _truncate),
    ('custom_checkpoint_0.pkl', _truncate), ('model.safetensors', _zero), ('optimizer.bin', _zero),
    ('random_states_0.pkl', _zero),
])
def test_resume_falls_back_past_a_corrupt_checkpoint(two_checkpoints, tmp_path, caplog, name, damage):
    run = tmp_path / 'run'
    shutil.copytree(two_checkpoints, run)
    damage(run / 'checkpoints' / 'checkpoint_1' / name)
    ctx = _setup(fast_args(tmp_path, '--checkpoint-steps', '2', '--resume', 'auto'))
    ctx.lock.release()
    assert ctx.last_checkpoint == str(run / 'checkpoints' / 'checkpoint_0')
    assert (ctx.state.update, ctx.state.batch_in_epoch) == (2, 2)
    warning = ' '.join(r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
    assert f'{run / "checkpoints" / "checkpoint_1"} does not load' in warning and name in warning, warning
    assert 'falling back to' in warning


def test_resume_with_no_loadable_checkpoint_is_one_error(two_checkpoints, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(two_checkpoints, run)
    for checkpoint in _checkpoints(run):
        _truncate(checkpoint / 'optimizer.bin')
    code = run_cli(lambda: train(fast_args(tmp_path, '--checkpoint-steps', '2', '--resume', 'auto')))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 6 and len(err) == 1 and err[0].startswith(f'error: resume: no checkpoint of {run} loads'), err
    assert 'checkpoint_1: optimizer.bin is' in err[0] and 'checkpoint_0: optimizer.bin is' in err[0]


def test_files_honour_the_umask(two_checkpoints):
    mode = lambda path: oct(path.stat().st_mode & 0o777)  # noqa: E731
    assert mode(two_checkpoints / 'model') == '0o775'
    assert {mode(p) for p in (two_checkpoints / 'model').iterdir()} == {'0o664'}
    assert mode(two_checkpoints / 'results.json') == '0o664' and mode(two_checkpoints / 'config.yaml') == '0o664'
    checkpoint = two_checkpoints / 'checkpoints' / 'checkpoint_1'
    assert mode(checkpoint) == '0o775' and {mode(p) for p in checkpoint.iterdir()} == {'0o664'}  # safetensors: 0600


# ---------------------------------------------------------------------------------------------------------
# 3. NaN / inf: the checkpoint named is finite and resumes


def _blow_up_after_update(monkeypatch, update, how):
    """After optimizer update ``update``: ``how(model)`` damages the state; the next loss is NaN."""
    seen, handles = {'calls': 0, 'steps': 0}, []
    original = Criterion.__call__

    def criterion(self, model, logits, target):
        seen['model'], seen['calls'] = model, seen['calls'] + 1
        loss, parts = original(self, model, logits, target)
        return (loss * float('nan') if seen['calls'] == update + 1 else loss), parts

    def after_step(optimizer, args, kwargs):
        seen['steps'] += 1
        if seen['steps'] == update:
            with torch.no_grad():
                how(seen['model'])

    monkeypatch.setattr(Criterion, '__call__', criterion)
    handles.append(register_optimizer_step_post_hook(after_step))
    return handles


def _inf_running_var(model):
    next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var[0] = float('inf')


def _huge_weights(model):
    next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1e25)


@pytest.mark.parametrize('how', [_inf_running_var, _huge_weights])
def test_nan_names_a_finite_checkpoint_that_resumes(tmp_path, monkeypatch, capsys, how):
    handles = _blow_up_after_update(monkeypatch, 4, how)
    try:
        with pytest.raises(NonFiniteLossError) as info:
            train(fast_args(tmp_path, '--checkpoint-steps', '2', epochs=2))
    finally:
        for handle in handles:
            handle.remove()
    monkeypatch.undo()
    message = str(info.value)
    good = Path(message.split('last good checkpoint is ')[1].split(' ')[0])
    assert good.name == 'checkpoint_0', message  # update 2; the state after update 4 is the blown-up one
    tensors = load_file(str(good / 'model.safetensors'))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    assert max(float(t.abs().max()) for t in tensors.values() if t.is_floating_point() and t.numel()) < 1e6

    _fresh_state()
    capsys.readouterr()
    results = train(fast_args(tmp_path, '--checkpoint-steps', '2', '--resume', 'auto', epochs=2))
    assert f'resumed from {good}: epoch 0, batch 2, update 2' in capsys.readouterr().out
    assert results['updates'] == 8 and all(h['train_loss'] < 10 for h in results['history'])


# ---------------------------------------------------------------------------------------------------------
# 4. one run per output folder


def _hold(run, started, stop):
    lock = RunLock(run).acquire()
    started.set()
    stop.wait(60)
    lock.release()


def _holder(run):
    """Another process holding ``run``'s lock (a fork: it imports nothing, so it starts in milliseconds)."""
    context = multiprocessing.get_context('fork')
    started, stop = context.Event(), context.Event()
    process = context.Process(target=_hold, args=(run, started, stop), daemon=True)
    process.start()
    assert started.wait(30), 'the holder did not lock'
    return process


def test_second_run_on_one_folder_is_refused_naming_the_first(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.yaml').write_text('the first run\n')
    holder = _holder(run)
    try:
        with pytest.raises(RunLockedError) as info:
            train(fast_args(tmp_path))
        message = str(info.value)
        assert f'{run} is in use by another run (pid {holder.pid} on {socket.gethostname()}, started 20' in message
        assert f'UTC: {shlex.join(sys.argv)})' in message
        assert (run / 'config.yaml').read_text() == 'the first run\n'
        assert run_cli(lambda: train(fast_args(tmp_path))) == 6
        assert capsys.readouterr().err.count('error: output_dir:') == 1
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: the kernel drops its lock, no stale lock is left
        holder.join()
    RunLock(run).acquire().release()


def test_the_lock_is_released_when_a_run_ends(tmp_path):
    with pytest.raises(NonFiniteLossError):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Criterion, '__call__', lambda self, model, logits, target: (logits.sum() * float('inf'), {}))
            train(fast_args(tmp_path))
    lock = RunLock(tmp_path / 'run').acquire()  # a failed run let go of it
    assert json.loads((tmp_path / 'run' / '.lock').read_text())['pid'] == os.getpid()
    lock.release()


# ---------------------------------------------------------------------------------------------------------
# 5. a full or read-only disk: one error line, what and where, the last good checkpoint kept


def _fail_second_checkpoint(monkeypatch, raise_error):
    """Writing the model file of checkpoint_1 fails with ``raise_error(path)``."""
    import accelerate.utils.other as other

    original = other.safe_save_file

    def safe_save_file(obj, path, *args, **kwargs):
        if 'checkpoint_1' in str(path):
            Path(path).write_bytes(b'half a file')
            raise_error(path)
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(other, 'safe_save_file', safe_save_file)


def _no_space(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _torch_stream_writer(path):  # how torch.save says it when the disk fills up
    raise RuntimeError('[enforce fail at inline_container.cc:664] . unexpected pos 6508672 vs 6508560')


def _read_only(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


@pytest.mark.parametrize('raise_error, reason', [(_no_space, 'no space left on device'),
                                                 (_torch_stream_writer, 'no space left on device'),
                                                 (_read_only, 'read-only file system')])
def test_write_failure_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, raise_error, reason):
    _fail_second_checkpoint(monkeypatch, raise_error)
    if raise_error is _torch_stream_writer:
        monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 1024))
    code = run_cli(lambda: train(fast_args(tmp_path, '--checkpoint-steps', '2')))
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / 'run'
    assert code == 6 and len(err) == 1, err
    assert err[0].startswith(f'error: saving checkpoint {run / "checkpoints" / "checkpoint_1"}: {reason}'), err
    assert f'the last good checkpoint {run / "checkpoints" / "checkpoint_0"} is kept' in err[0]
    assert [p.name for p in _checkpoints(run)] == ['checkpoint_0'] and is_complete(run / 'checkpoints' / 'checkpoint_0')


def test_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    from pce_timm.train.trackers import CSVTracker

    def log(self, values, step=None, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(CSVTracker, 'log', log)
    assert run_cli(lambda: train(fast_args(tmp_path))) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: training: no space left on device: {tmp_path / "run" / "logs"}')
    assert 'no checkpoint had been saved yet' in err[0]


def test_unwritable_output_dir_is_refused_at_start(tmp_path, monkeypatch, capsys):
    run = tmp_path / 'run'
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    assert run_cli(lambda: train(fast_args(tmp_path))) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: output_dir: {tmp_path} is not writable (permission denied); choose another --output-dir '
                   'or make it writable'], err
    assert not run.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='chmod does not stop root from writing')
def test_read_only_output_dir_by_chmod(tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        assert run_cli(lambda: train(fast_args(tmp_path))) == 6
    finally:
        tmp_path.chmod(0o755)
    assert 'is not writable (permission denied)' in capsys.readouterr().err
