"""Export a model to ONNX, a ``torch.export`` program or TorchScript, and check the written file against eager.

:func:`export_model` writes the file atomically (a temporary sibling renamed into place only once the file has
been reloaded and its outputs match the eager model's), so a failed export or parity check leaves nothing at
the output path. ``scripts/export.py`` is its command line.

What a PCE layer becomes in an exported graph: exact eval sizes its expert buffers from the routing, which a
static graph cannot do, so an exported eval graph keeps a slot for every patch at every expert (the same
outputs as eager, whatever the input routes to, at up to E times the expert conv). With ``eval_capacity_factor``
set, the graph has training's slots instead (the cost of the training path; predictions then depend on the
batch, and the slots are sized from the example's batch). See ``PCEConv2d``.

ONNX needs the ``onnx`` extra (``pip install 'pce_timm[onnx]'``: onnx, onnxruntime, onnxscript).
"""
import contextlib
import importlib
import io
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from pce_timm.layers import pce_layers
from pce_timm.progress import progress_bar
from pce_timm.utils import atomic_file, markdown_table

__all__ = ['FORMATS', 'ONNX_EXPORTERS', 'ExportError', 'ExportReport', 'MissingExtraError', 'check_batches',
           'export_model', 'load_exported', 'load_source_model', 'require_extra', 'set_eval_capacity_factor']

FORMATS = ('onnx', 'exported-program', 'torchscript')
ONNX_EXPORTERS = ('dynamo', 'torchscript')  # torch.onnx.export(dynamo=True) / the TorchScript-based exporter
EXTRAS = {'onnx': ('onnx', 'onnxruntime', 'onnxscript')}
INPUT_NAME, OUTPUT_NAME = 'input', 'output'


class ExportError(Exception):
    """A bad export request, a failed export, or a written file whose outputs differ from the eager model's."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pce_timm extra that installs it."""


def require_extra(extra: str, what: str) -> None:
    """Import the modules of pce_timm's optional ``extra``; raise :class:`MissingExtraError` naming it if one is
    missing (``what``: the feature that needs them, for the message)."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                f"not installed: pip install 'pce_timm[{extra}]' (installs {', '.join(EXTRAS[extra])})")


def load_source_model(source: str) -> nn.Module:
    """The model of ``source``: a registry name (with a pretrained tag, ``pce_resnet18.fmnist``: its weights;
    a bare name: the untrained architecture), a run / model / checkpoint folder, ``local-dir:`` or ``hf-hub:``."""
    from pce_timm.train.models import load_model, resolve_model_source

    name, checkpoint = resolve_model_source(source)
    if checkpoint is not None or name != source or ':' in source:  # a folder, local-dir: or hf-hub:
        return load_model(source)
    architecture, tag = timm.models.split_model_name_tag(source)
    if not timm.is_model(architecture):
        raise ExportError(f'--model {source!r}: not a model, run or checkpoint folder, and not a registered model '
                          f"(timm.list_models('pce_*') lists the zoo; local-dir:DIR and hf-hub:ID work too)")
    return timm.create_model(source, pretrained=bool(tag))


def set_eval_capacity_factor(model: nn.Module, factor: Optional[float]) -> int:
    """Set ``eval_capacity_factor`` on every sparse token-choice PCE layer (None: exact eval); returns how many.

    Raises:
        ExportError: ``factor`` is not None and the model has no such layer.
    """
    layers = [layer for layer in pce_layers(model).values() if not layer.soft and layer.choice == 'token']
    if factor is not None and not layers:
        raise ExportError('--eval-capacity-factor: the model has no sparse token-choice PCE layer (soft and expert '
                          'choice layers have no eval capacity)')
    if factor is not None and factor <= 0:
        raise ExportError(f'--eval-capacity-factor must be > 0, got {factor}')
    for layer in layers:
        layer.eval_capacity_factor = factor
    return len(layers)


def check_batches(batch_size: int, dynamic_batch: bool) -> Tuple[int, ...]:
    """The batch sizes parity is checked at: the example's, and with a dynamic batch also 1 and larger ones."""
    if not dynamic_batch:
        return (batch_size,)
    return tuple(sorted({1, batch_size, batch_size + 1, 2 * batch_size + 1}))


@dataclass
class ParityRow:
    batch: int
    max_abs_err: float
    eager_ms_per_image: float
    exported_ms_per_image: float


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and measured."""
    path: Path
    fmt: str
    file_bytes: int
    export_seconds: float
    atol: float
    rows: List[ParityRow] = field(default_factory=list)

    @property
    def max_abs_err(self) -> float:
        return max(row.max_abs_err for row in self.rows)

    def table(self) -> str:
        """The parity table: one row per checked batch size."""
        rows = [[self.fmt, str(r.batch), f'{r.max_abs_err:.2e}', f'{self.file_bytes / 2 ** 20:.1f} MiB',
                 f'{r.eager_ms_per_image:.2f}', f'{r.exported_ms_per_image:.2f}'] for r in self.rows]
        return markdown_table(['format', 'batch', 'max abs err', 'file size', 'eager ms/img', 'exported ms/img'],
                              rows, '<>>>>>')


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' deprecation and tracer warnings are about their own APIs, not the model: keep them out."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=FutureWarning)
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        yield


def _write(model: nn.Module, fmt: str, example: torch.Tensor, path: Path, dynamic_batch: bool,
           onnx_exporter: str) -> None:
    batch = {0: torch.export.Dim('batch')}
    with torch.no_grad(), _quiet_exporters():
        if fmt == 'torchscript':  # scripted, not traced: the exact eval path and any batch size
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == 'exported-program':
            program = torch.export.export(model, (example,), dynamic_shapes=(batch,) if dynamic_batch else None)
            buffer = io.BytesIO()  # torch.export.save takes a buffer or a path ending in .pt2, not the temporary
            torch.export.save(program, buffer)
            path.write_bytes(buffer.getvalue())
        elif onnx_exporter == 'dynamo':
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=(batch,) if dynamic_batch else None, external_data=False, optimize=True,
                verbose=False)
        else:
            axes = {INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}} if dynamic_batch else None
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes=axes)


def load_exported(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reload a written file as a function of one input batch (ONNX: an onnxruntime CPU session)."""
    if fmt == 'onnx':
        import onnx
        import onnxruntime

        onnx.checker.check_model(str(path))
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with _quiet_exporters():
        if fmt == 'torchscript':
            return torch.jit.load(str(path))
        return torch.export.load(io.BytesIO(path.read_bytes())).module()


def _ms_per_image(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / x.shape[0]


def _check_parity(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], input_size: Sequence[int],
                  batches: Sequence[int], repeats: int, bar) -> List[ParityRow]:
    rows = []
    for batch in batches:
        bar.set_description(f'parity at batch {batch}')
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = model(x)
            actual = exported(x)
            if actual.shape != expected.shape:
                raise ExportError(f'batch {batch}: the exported model gives shape {list(actual.shape)}, '
                                  f'eager {list(expected.shape)}')
            rows.append(ParityRow(batch, (actual.float() - expected.float()).abs().max().item(),
                                  _ms_per_image(model, x, repeats), _ms_per_image(exported, x, repeats)))
        bar.update()
    return rows


def export_model(
        model: nn.Module,
        fmt: str,
        output: Path,
        input_size: Sequence[int],
        batch_size: int = 2,
        dynamic_batch: bool = False,
        onnx_exporter: str = 'dynamo',
        atol: float = 1e-4,
        repeats: int = 3,
        progress: bool = True,
) -> ExportReport:
    """Export ``model`` (put in eval mode) to ``output`` and check the reloaded file against eager.

    Args:
        fmt: one of :data:`FORMATS`: ``onnx`` (run by onnxruntime), ``exported-program`` (``torch.export``,
            a ``.pt2``), ``torchscript`` (``torch.jit.script``: takes any batch size).
        input_size: (C, H, W) of the example input.
        batch_size: the example's batch size. A dynamic batch is traced with at least 2 (``torch.export``
            specialises size-1 dims).
        dynamic_batch: export the batch dimension as dynamic; parity is then checked at
            :func:`check_batches` (1 up to ``2 * batch_size + 1``).
        onnx_exporter: ``dynamo`` (``torch.onnx.export(dynamo=True)``) or ``torchscript`` (the older one).
        atol: the largest max-abs difference from the eager outputs accepted (float32).
        repeats: timed runs per batch size (medians) for the eager and exported time per image.

    Raises:
        ExportError: bad arguments, an export that fails, or outputs that differ by more than ``atol``; nothing
            is then left at ``output``.
        MissingExtraError: ONNX without the onnx extra.
    """
    if fmt not in FORMATS:
        raise ExportError(f'--format: got {fmt!r}; accepted: {", ".join(FORMATS)}')
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ExportError(f'--onnx-exporter: got {onnx_exporter!r}; accepted: {", ".join(ONNX_EXPORTERS)}')
    if batch_size < 1:
        raise ExportError(f'--batch-size must be >= 1, got {batch_size}')
    if len(input_size) != 3 or any(size < 1 for size in input_size):
        raise ExportError(f'input size must be (channels, height, width) >= 1, got {tuple(input_size)}')
    capacity_layers = [n for n, layer in pce_layers(model).items() if layer.eval_capacity_factor is not None]
    if dynamic_batch and capacity_layers and fmt != 'torchscript':
        raise ExportError(f'--dynamic-batch: eval_capacity_factor is set on {len(capacity_layers)} PCE layer(s) '
                          f'({capacity_layers[0]}, ...), whose slots are sized from the batch, and a traced graph '
                          'keeps the example\'s sizes: export with a fixed --batch-size, or leave '
                          'eval_capacity_factor unset (exact routing at any batch size)')
    if fmt == 'onnx':
        require_extra('onnx', 'ONNX export')
    output = Path(output)
    if output.is_dir():
        raise ExportError(f'--output {output}: is a folder; give a file name')
    if fmt == 'exported-program' and output.suffix != '.pt2':
        raise ExportError(f'--output {output}: an exported program is a .pt2 file (torch.export.load reads only '
                          f'those); name it {output.with_suffix(".pt2").name}')
    model.eval()
    trace_batch = max(batch_size, 2) if dynamic_batch else batch_size
    example = torch.randn(trace_batch, *input_size, generator=torch.Generator().manual_seed(0))
    batches = check_batches(batch_size, dynamic_batch or fmt == 'torchscript')
    with progress_bar(total=len(batches) + 2, desc=f'export {fmt}', disable=not progress) as bar:
        with atomic_file(output) as tmp:
            start = time.perf_counter()
            try:
                _write(model, fmt, example, tmp, dynamic_batch, onnx_exporter)
            except Exception as e:
                raise ExportError(f'{fmt} export failed: {type(e).__name__}: {str(e).strip().splitlines()[-1]}') from e
            export_seconds = time.perf_counter() - start
            bar.update()
            bar.set_description('reload')
            exported = load_exported(tmp, fmt)
            bar.update()
            report = ExportReport(output, fmt, tmp.stat().st_size, export_seconds, atol)
            report.rows = _check_parity(model, exported, input_size, batches, repeats, bar)
            if report.max_abs_err > atol or report.max_abs_err != report.max_abs_err:  # NaN: not a match either
                raise ExportError(f'parity: the exported {fmt} differs from the eager model by up to '
                                  f'{report.max_abs_err:.3g} (> {atol:g}), nothing written to {output}\n'
                                  f'{report.table()}')
    return report
