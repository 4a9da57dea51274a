"""Side-by-side CPU timing of PCE layers and models against their dense baselines.

Cases are timed interleaved (one run of each case per round, many rounds), so load that comes and goes on
the machine hits every case alike and the ratios stay meaningful; each number is the median over rounds.
"""
import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from .layers import PCEConv2d
from .layers.dispatch import slots as pce_module  # the module whose gathers free_gathers() replaces


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    info: Dict[str, object] = field(default_factory=dict)


@dataclass
class Timing:
    name: str
    info: Dict[str, object]
    forward_ms: float
    train_ms: float
    forward_ratio: float = 1.0
    train_ratio: float = 1.0


def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _run_forward(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def _run_train(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.float().pow(2).mean().backward()


def time_cases(
        cases: List[Case],
        make_input: Callable[[], torch.Tensor],
        rounds: int = 10,
        warmup: int = 2,
        desc: str = 'timing',
) -> List[Timing]:
    """Median forward (eval, no grad) and forward+backward (train) time of each case, interleaved.

    The first case is the baseline every ratio refers to.
    """
    modules = [case.build() for case in cases]
    x = make_input()
    x_grad = x.clone().requires_grad_()
    samples = {case.name: ([], []) for case in cases}
    for step in tqdm(range(warmup + rounds), desc=desc, leave=False):
        for case, module in zip(cases, modules, strict=True):
            module.eval()
            t0 = time.perf_counter()
            _run_forward(module, x)
            t1 = time.perf_counter()
            module.train()
            _run_train(module, x_grad)
            t2 = time.perf_counter()
            if step >= warmup:
                samples[case.name][0].append((t1 - t0) * 1e3)
                samples[case.name][1].append((t2 - t1) * 1e3)
    timings = [Timing(case.name, case.info, _median(samples[case.name][0]), _median(samples[case.name][1]))
               for case in cases]
    base = timings[0]
    for timing in timings:
        timing.forward_ratio = timing.forward_ms / base.forward_ms
        timing.train_ratio = timing.train_ms / base.train_ms
    return timings


def profile_case(case: Case, make_input: Callable[[], torch.Tensor], steps: int = 5, row_limit: int = 25) -> str:
    """torch.profiler table of ``steps`` training steps (forward + backward) of one case, by self CPU time.

    The profiler adds overhead to every op, so its times run higher than :func:`time_cases`; read it for where
    the time goes, not for how much there is.
    """
    from torch.profiler import ProfilerActivity, profile

    module = case.build().train()
    x = make_input().requires_grad_()
    for _ in range(2):
        _run_train(module, x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            _run_train(module, x)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by='self_cpu_time_total', row_limit=row_limit, max_name_column_width=40, max_shapes_column_width=60)


def dense_conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


def layer_cases(
        channels: int = 64,
        patch_size: int = 8,
        kernel_size: int = 3,
        experts: tuple = (4, 8),
        mix_conv_variants: tuple = (True, False),
) -> List[Case]:
    """Dense Conv-BN-ReLU first, then PCEConv2d soft / top-1 / top-2 for each expert count."""
    cases = [Case('dense', lambda: dense_conv_bn_relu(channels, channels, kernel_size), {'E': 1, 'routing': 'dense'})]
    for num_experts in experts:
        for top_k in (None, 1, 2):
            for mix_conv in mix_conv_variants:
                routing = 'soft' if top_k is None else f'top-{top_k}'
                name = f'pce E={num_experts} {routing}' + ('' if mix_conv else ' no-mix')
                info = {'E': num_experts, 'routing': routing, 'mix_conv': mix_conv}

                def build(e=num_experts, k=top_k, mix=mix_conv) -> nn.Module:
                    return PCEConv2d(channels, channels, kernel_size, num_experts=e, patch_size=patch_size,
                                     top_k=k, mix_conv=mix)
                cases.append(Case(name, build, info))
    return cases


def layer_goals(timings: List[Timing]) -> List[Dict[str, object]]:
    """The issue's layer goals, checked on measured ratios. Missing cases are reported, not passed."""
    by_name = {t.name: t for t in timings}
    goals = []

    def check(label: str, name: str, value_fn: Callable[[Timing], float], limit: float, target: Optional[float]):
        timing = by_name.get(name)
        value = value_fn(timing) if timing else float('nan')
        goals.append({'goal': label, 'case': name, 'value': round(value, 3), 'limit': limit, 'target': target,
                      'ok': bool(timing) and value <= limit})

    for suffix in ('', ' no-mix'):
        check('top-1 E=8 fwd+bwd / dense', f'pce E=8 top-1{suffix}', lambda t: t.train_ratio, 1.25, 1.15)
        check('soft E=8 fwd+bwd / (8 x dense)', f'pce E=8 soft{suffix}', lambda t: t.train_ratio / 8, 1.1, None)
    return goals


def format_table(timings: List[Timing], columns: List[str], forward: bool = True) -> str:
    """Markdown table of timings; ``columns`` picks keys of ``Timing.info`` to show after the name.

    ``forward=False`` leaves out the forward (eval) columns and shows only the training step.
    """
    header = ['case'] + columns + (['fwd ms', 'fwd x'] if forward else []) + ['fwd+bwd ms', 'fwd+bwd x']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for t in timings:
        cells = [t.name] + [str(t.info.get(c, '')) for c in columns]
        if forward:
            cells += [f'{t.forward_ms:.1f}', f'{t.forward_ratio:.2f}']
        cells += [f'{t.train_ms:.1f}', f'{t.train_ratio:.2f}']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


class _FreeGather(torch.autograd.Function):
    """Returns a stored tensor as the gather's output; the backward hands back stored zeros."""

    @staticmethod
    def forward(ctx, source, other_input, output, source_zeros, other_zeros):
        ctx.zeros = (source_zeros, other_zeros)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_out):
        source_zeros, other_zeros = ctx.zeros
        return source_zeros, other_zeros, None, None, None


class _StoredTensors:
    """Tensors made once per shape and reused, so a stand-in costs no allocation or fill per step."""

    def __init__(self):
        self._store: Dict[tuple, torch.Tensor] = {}

    def get(self, kind: str, like: torch.Tensor, make: Callable[[], torch.Tensor], *shape) -> torch.Tensor:
        key = (kind, like.dtype) + tuple(shape)
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]


@contextlib.contextmanager
def free_gathers(store: _StoredTensors) -> Iterator[None]:
    """Within the block, the top-1 sparse path's two gathers cost nothing (and compute nothing).

    ``gather_windows`` returns stored random windows of the right shape and layout, and ``gather_rows_top1``
    stored random rows; their backwards return stored zeros. Everything else in the layer runs as usual
    (embedding, router, slot assignment, index maps, grouped conv, BatchNorm, ReLU, 1x1 mix), so a layer
    timed inside this block gives a lower bound for any implementation of the two gathers, fused kernels
    included. Only the training step is bounded so: eval takes the layer's exact path, which gathers by other
    means. A timing tool only: the layer's output is meaningless inside the block.
    """
    def windows(x, pixel_index, slot_of_assignment, geometry):
        s, wh, ww, e = pixel_index.shape
        c = x.shape[1]
        out = store.get('windows', x, lambda: torch.randn(s, wh, ww, e * c, dtype=x.dtype), s, wh, ww, e, c)
        x_zeros = store.get('zeros', x, lambda: torch.zeros_like(x), *x.shape)
        no_second = store.get('empty', x, lambda: x.new_zeros(0))
        return _FreeGather.apply(x, no_second, out.permute(0, 3, 1, 2), x_zeros, None)

    def rows_top1(source, index, inverse, token_weight, pixel_token):
        m, d = index.shape[0], source.shape[1]
        out = store.get('rows', source, lambda: torch.randn(m, d, dtype=source.dtype), m, d)
        source_zeros = store.get('zeros', source, lambda: torch.zeros_like(source), *source.shape)
        weight_zeros = store.get('zeros', token_weight, lambda: torch.zeros_like(token_weight), *token_weight.shape)
        return _FreeGather.apply(source, token_weight, out, source_zeros, weight_zeros)

    originals = pce_module.gather_windows, pce_module.gather_rows_top1
    pce_module.gather_windows, pce_module.gather_rows_top1 = windows, rows_top1
    try:
        yield
    finally:
        pce_module.gather_windows, pce_module.gather_rows_top1 = originals


class FreeGathers(nn.Module):
    """A top-1 PCEConv2d whose two gathers cost nothing (:func:`free_gathers`): a timing lower bound."""

    def __init__(self, layer: PCEConv2d):
        super().__init__()
        if layer.soft or layer.top_k != 1 or layer.capacity_factor < 1:
            raise ValueError('FreeGathers times the top-1 sparse path with capacity_factor >= 1 (no choice dropped); '
                             f'got a layer with {layer.extra_repr()}, capacity_factor={layer.capacity_factor}')
        self.layer = layer
        self._store = _StoredTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with free_gathers(self._store):
            return self.layer(x)


def bound_cases(channels: int = 64, patch_size: int = 8, kernel_size: int = 3, num_experts: int = 8) -> List[Case]:
    """Dense, dense + the 1x1 conv the PCE design adds, and top-1 PCE with its real and with free gathers."""
    def dense_then_mix() -> nn.Module:
        return nn.Sequential(dense_conv_bn_relu(channels, channels, kernel_size), nn.Conv2d(channels, channels, 1))

    def top1(mix: bool = True) -> PCEConv2d:
        return PCEConv2d(channels, channels, kernel_size, num_experts=num_experts, patch_size=patch_size, top_k=1,
                         mix_conv=mix)

    name = f'pce E={num_experts} top-1'
    return [
        Case('dense', lambda: dense_conv_bn_relu(channels, channels, kernel_size)),
        Case('dense + 1x1 conv', dense_then_mix),
        Case(name, top1),
        Case(f'{name}, free gathers', lambda: FreeGathers(top1())),
        Case(f'{name} no-mix, free gathers', lambda: FreeGathers(top1(mix=False))),
    ]


def bound_verdict(timings: List[Timing], num_experts: int = 8, limit: float = 1.25) -> Dict[str, object]:
    """Whether faster gathers alone could bring top-1 under ``limit``: not if it misses with free gathers."""
    by_name = {t.name: t for t in timings}
    bound = by_name.get(f'pce E={num_experts} top-1, free gathers')
    value = bound.train_ratio if bound else float('nan')
    return {'case': f'pce E={num_experts} top-1, free gathers', 'value': round(value, 3), 'limit': limit,
            'reachable_by_faster_gathers': bool(bound) and value <= limit}


def timings_to_dict(timings: List[Timing]) -> List[Dict[str, object]]:
    return [asdict(t) for t in timings]
