"""Expert surgery: remove rarely used experts from a trained PCE model, or split its busiest ones in two.

Both operations *re-index* a layer's experts: pruning keeps a subset of them, reinforcement appends a copy of
one. Every per-expert tensor follows the new index, so nothing else needs to know:

- the experts' conv weight [e, o, i, k, k] and their BatchNorm over e * o channels (expert j owns channels
  ``j * o .. (j + 1) * o``: affine parameters and running statistics);
- the router's per-expert entries: cosine keys [e, d], the MLP's last layer [e, h] + [e], positional anchors
  [e, 2] (the uniform router has none);
- the layer's ``logit_bias`` [e].

The router's softmax (and top-k) then runs over the remaining experts: probabilities renormalise by
themselves.

What stays exact (in eval mode, up to float rounding), and what does not:

- pruning experts the router gives no weight leaves the output unchanged: with top-k routing, experts never
  among a patch's k choices; with soft routing, experts of probability ~0 (a soft expert that is never the
  top-1 choice still has weight, and its share moves to the others);
- reinforcing with ``noise_std=0`` leaves the output unchanged for soft and top-1 routing. Soft: both copies
  get ``logit_bias + log(1/2)``, so they split the original's probability and their outputs add up to the
  original's. Top-1: the copies tie; whichever is chosen computes the same output with weight 1 (no bias:
  halving the pair's logits could hand patches to another expert). Top-k with 1 < k: the tied copies take two
  of a patch's k choices, so the output changes (a warning says so);
- sparse (top-k) layers send every patch in eval to exactly its chosen experts, whatever e is (in training
  each expert has ``ceil(capacity_factor * t * k / e)`` slots, so with e changed an overflowing layer reroutes
  other patches than before);
- a patch whose best experts tie (e.g. equidistant from two positional anchors) goes to whichever
  ``torch.topk`` lists first, which may differ once e changes;
- the uniform router has no per-expert entries: it spreads patches round-robin over however many experts
  there are, so surgery changes its routing.

The surgery is recorded in the model's ``expert_counts`` model arg (see
:class:`~pce_timm.models.pce_resnet.PCEResNet`), so ``timm.models.save_for_hf`` /
``pce_timm.train.checkpoint.save_model_dir`` write a ``config.json`` from which
``timm.create_model('local-dir:<folder>', pretrained=True)`` rebuilds the changed model and loads its weights
strictly.

Usage counts (``usage``) are per layer the top-1 choices of each expert, as in ``stats.json``
(``layers[name]['usage_counts']``, :func:`usage_from_stats`), a
:class:`~pce_timm.analysis.stats.RoutingAccumulator`'s ``counts``, or :func:`collect_usage`.
"""
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers import PCEConv2d, pce_layers
from ..layers.routers import CosineRouter, MLPRouter, PositionalRouter, UniformRouter
from ..layers.routing_stats import _check_counts
from ..models._timm_compat import get_model_args, record_model_args
from ..models.pce_resnet import PCEResNet

__all__ = [
    'SurgeryError', 'check_surgery', 'prune_experts', 'reinforce_experts', 'collect_usage', 'usage_from_stats',
    'expert_counts', 'evaluate_top1', 'evaluate_surgery', 'format_surgery_table',
]

Counts = Union[torch.Tensor, Sequence[int]]
ExpertMap = Dict[str, List[int]]


class SurgeryError(ValueError):
    """A surgery request that does not fit the model: not a PCE-ResNet, unknown layers, bad expert ids."""


def check_surgery(model: nn.Module, keep: Optional[Iterable[Tuple[str, Sequence[int]]]] = None,
                  reinforce: Optional[Union[str, Sequence[str]]] = None) -> None:
    """Check a surgery request against ``model`` before any work is done (``scripts/surgery.py`` calls it
    right after loading), with what the command line accepts in the message.

    Args:
        keep: ``(layer, expert ids)`` pairs (``--keep LAYER=ID,ID``; a layer named twice is refused).
        reinforce: layer names (``--reinforce``), or ``'all'`` / an empty list for every PCE layer.

    Raises:
        SurgeryError: not a PCE-ResNet, layer names it does not have (listing those it has), or expert ids
            :func:`prune_experts` would refuse.
    """
    try:
        layers = _check_model(model)
    except TypeError as e:
        raise SurgeryError(f'{e}; pass the run or model folder of a pce_resnet* model') from None
    accepted = f'the PCE layers of this model are {", ".join(layers)}'
    pairs = list(keep or [])
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SurgeryError(f'--keep names {", ".join(repeated)} more than once; name each layer once, with every '
                           f'expert it keeps (LAYER=ID,ID,...)')
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise SurgeryError(f'--keep names unknown PCE layers {", ".join(unknown)}; {accepted}')
    for name, ids in pairs:
        try:
            _check_keep(name, ids, layers[name])
        except (TypeError, ValueError) as e:
            raise SurgeryError(f'--keep {name}={",".join(map(str, ids))}: {e} (its experts are 0..'
                               f'{layers[name].num_experts - 1})') from None
    if reinforce and reinforce != 'all':
        unknown = sorted(set(reinforce) - set(layers))
        if unknown:
            raise SurgeryError(f'--reinforce names unknown PCE layers {", ".join(unknown)}; {accepted} (no names: '
                               f'every PCE layer)')


def _check_model(model: nn.Module) -> Dict[str, PCEConv2d]:
    """The model's PCE layers; only a PCE-ResNet can record the surgery in its model args."""
    if not isinstance(model, PCEResNet):
        raise TypeError(f'expert surgery needs a PCEResNet (its expert_counts model arg records the surgery so a '
                        f'saved model rebuilds), got {type(model).__name__}')
    return pce_layers(model)


def _check_layer_names(names: Iterable[str], layers: Mapping[str, PCEConv2d], arg: str) -> None:
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise ValueError(f'{arg} names unknown PCE layers {unknown}; accepted: {list(layers)}')


def _check_usage(usage: Mapping[str, Counts], layers: Mapping[str, PCEConv2d]) -> Dict[str, torch.Tensor]:
    """Usage counts as float64 tensors, one entry per expert of their layer."""
    if not isinstance(usage, Mapping):
        raise TypeError(f'usage must map PCE layer names to per-expert counts, got {type(usage).__name__}')
    _check_layer_names(usage, layers, 'usage')
    checked = {}
    for name, counts in usage.items():
        try:
            counts = _check_counts(counts)
        except ValueError as e:
            raise ValueError(f'usage[{name!r}]: {e}') from None
        if counts.numel() != layers[name].num_experts:
            raise ValueError(f'usage[{name!r}] must hold one count per expert ({layers[name].num_experts}), '
                             f'got {counts.numel()}')
        checked[name] = counts
    return checked


def _min_experts(layer: PCEConv2d) -> int:
    """The fewest experts a layer can route to: top_k for sparse routing, 1 for soft."""
    return 1 if layer.soft else layer.top_k


def _check_keep(name: str, keep: Any, layer: PCEConv2d) -> List[int]:
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise TypeError(f'keep[{name!r}] must be a list of expert ids, got {type(keep).__name__}')
    ids = list(keep)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f'keep[{name!r}] must hold int expert ids, got {ids!r}')
    if len(set(ids)) != len(ids) or any(not 0 <= i < layer.num_experts for i in ids):
        raise ValueError(f'keep[{name!r}] must hold distinct expert ids in [0, {layer.num_experts}), got {ids}')
    if not ids:
        raise ValueError(f'keep[{name!r}] keeps no expert; keep at least one')
    if len(ids) < _min_experts(layer):
        raise ValueError(f'keep[{name!r}] keeps {len(ids)} experts, fewer than the layer\'s top_k={layer.top_k}')
    return sorted(ids)


def _keep_from_usage(min_usage: float, usage: Mapping[str, torch.Tensor],
                     layers: Mapping[str, PCEConv2d]) -> Dict[str, List[int]]:
    keep = {}
    for name, counts in usage.items():
        share = counts / counts.sum()
        ids = [int(i) for i in torch.nonzero(share >= min_usage).flatten()]
        if len(ids) < _min_experts(layers[name]):
            raise ValueError(
                f'min_usage={min_usage} would keep {len(ids)} experts of {name!r} (usage shares '
                f'{[round(float(s), 4) for s in share]}); it needs at least {_min_experts(layers[name])}')
        keep[name] = ids
    return keep


def _reindexed_bn(bn: nn.BatchNorm2d, channels: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm over ``channels`` of ``bn`` (affine parameters and running statistics copied)."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = nn.BatchNorm2d(len(channels), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats, device=ref.device, dtype=ref.dtype)
    new.train(bn.training)
    for name in ('weight', 'bias'):
        if getattr(bn, name) is not None:
            getattr(new, name).data.copy_(getattr(bn, name).detach()[channels])
            getattr(new, name).requires_grad_(getattr(bn, name).requires_grad)
    if bn.track_running_stats:
        new.running_mean.copy_(bn.running_mean[channels])
        new.running_var.copy_(bn.running_var[channels])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _reindexed_param(param: nn.Parameter, index: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(param.detach()[index].clone(), requires_grad=param.requires_grad)


def _reindex_router(router: nn.Module, index: torch.Tensor) -> None:
    """Re-index the router's per-expert entries (see the module docstring)."""
    num_experts = len(index)
    if isinstance(router, CosineRouter):
        router.keys = _reindexed_param(router.keys, index)
    elif isinstance(router, MLPRouter):
        fc2 = router.fc2
        new = nn.Linear(fc2.in_features, num_experts, bias=fc2.bias is not None,
                        device=fc2.weight.device, dtype=fc2.weight.dtype)
        new.weight = _reindexed_param(fc2.weight, index)
        if fc2.bias is not None:
            new.bias = _reindexed_param(fc2.bias, index)
        router.fc2 = new
    elif isinstance(router, PositionalRouter):
        router.anchors = router.anchors[index].clone()
    elif not isinstance(router, UniformRouter):
        raise TypeError(f'expert surgery does not know the per-expert entries of {type(router).__name__}')
    if hasattr(router, 'num_experts'):
        router.num_experts = num_experts


@torch.no_grad()
def _reindex_layer(layer: PCEConv2d, index: Sequence[int]) -> None:
    """Make expert j of ``layer`` a copy of its old expert ``index[j]``, for every per-expert tensor."""
    device = layer.logit_bias.device
    idx = torch.as_tensor(list(index), dtype=torch.long, device=device)
    experts, out_chs = layer.experts, layer.experts.out_chs
    channels = (idx.unsqueeze(1) * out_chs + torch.arange(out_chs, device=device)).reshape(-1)
    experts.weight = _reindexed_param(experts.weight, idx)
    experts.bn = _reindexed_bn(experts.bn, channels)
    experts.num_experts = len(idx)
    _reindex_router(layer.router, idx)
    layer.logit_bias = layer.logit_bias[idx].clone()
    layer.balance_bias = layer.balance_bias[idx].clone()  # loss-free balancing: a copy inherits the original's
    layer.num_experts = len(idx)
    if layer.soft:
        layer.top_k = len(idx)
    layer.last_router_logits = layer.last_routing_weights = layer.last_expert_indices = None
    layer.last_embeddings = layer.last_expert_mask = None


def _record(model: PCEResNet, layers: Mapping[str, PCEConv2d], changed: Iterable[str]) -> None:
    """Add the changed layers' expert counts to the model args (what a saved config.json rebuilds from)."""
    counts = dict(get_model_args(model).get('expert_counts') or {})
    counts.update({name: layers[name].num_experts for name in changed})
    record_model_args(model, expert_counts=counts)


def prune_experts(
        model: nn.Module,
        keep: Optional[Mapping[str, Sequence[int]]] = None,
        min_usage: Optional[float] = None,
        usage: Optional[Mapping[str, Counts]] = None,
) -> ExpertMap:
    """Remove experts from a PCE-ResNet's layers, in place.

    Say which experts stay either explicitly (``keep``) or by usage: every expert of a layer in ``usage`` whose
    share of the top-1 choices is below ``min_usage`` goes.

    Args:
        model: a PCE-ResNet (``deepcopy`` it first to keep the original).
        keep: PCE layer name -> ids of the experts to keep; layers not named are left alone.
        min_usage: usage share in [0, 1] below which an expert is removed; needs ``usage``.
        usage: PCE layer name -> top-1 count per expert (see the module docstring); only these layers change.

    Returns:
        For every changed layer, the old id of each remaining expert (new expert j was old expert ``ids[j]``).

    Raises:
        ValueError: unknown layer names, expert ids out of range or repeated, a threshold outside [0, 1], or a
            layer left with no expert (or fewer than its top_k).
    """
    layers = _check_model(model)
    if (keep is None) == (min_usage is None):
        raise ValueError('prune_experts: pass exactly one of keep (expert ids per layer) or min_usage (with usage)')
    if keep is not None:
        if usage is not None:
            raise ValueError('prune_experts: usage is only read with min_usage; with keep, drop it')
        if not isinstance(keep, Mapping):
            raise TypeError(f'keep must map PCE layer names to lists of expert ids, got {type(keep).__name__}')
        _check_layer_names(keep, layers, 'keep')
        kept = {name: _check_keep(name, ids, layers[name]) for name, ids in keep.items()}
    else:
        if isinstance(min_usage, bool) or not isinstance(min_usage, (int, float)) or not 0.0 <= min_usage <= 1.0:
            raise ValueError(f'min_usage must be a usage share in [0, 1], got {min_usage!r}')
        if usage is None:
            raise ValueError('min_usage needs usage: per layer, the top-1 count of each expert')
        kept = _keep_from_usage(float(min_usage), _check_usage(usage, layers), layers)
    changed = {name: ids for name, ids in kept.items() if len(ids) < layers[name].num_experts}
    for name, ids in changed.items():
        _reindex_layer(layers[name], ids)
    _record(model, layers, changed)
    return changed


def _busiest(layers: Mapping[str, PCEConv2d], names: Sequence[str],
             usage: Optional[Mapping[str, Counts]]) -> Dict[str, int]:
    if usage is None:
        raise ValueError('reinforcing the busiest expert needs usage: per layer, the top-1 count of each expert')
    checked = _check_usage(usage, layers)
    missing = [name for name in names if name not in checked]
    if missing:
        raise ValueError(f'usage has no counts for {missing}, so their busiest expert is unknown')
    return {name: int(checked[name].argmax()) for name in names}


def _resolve_duplicates(layers: Mapping[str, PCEConv2d], spec: Any,
                        usage: Optional[Mapping[str, Counts]]) -> Dict[str, int]:
    if isinstance(spec, Mapping):
        _check_layer_names(spec, layers, 'layers')
        for name, expert in spec.items():
            if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < layers[name].num_experts:
                raise ValueError(f'layers[{name!r}] must be an expert id in [0, {layers[name].num_experts}), '
                                 f'got {expert!r}')
        return dict(spec)
    if spec == 'all':
        names = list(usage) if usage is not None else list(layers)
    elif isinstance(spec, str) or not isinstance(spec, Iterable):
        raise ValueError(f"layers must be 'all', a list of PCE layer names or a dict name -> expert id, got {spec!r}")
    else:
        names = list(spec)
        _check_layer_names(names, layers, 'layers')
    if not names:
        raise ValueError('layers names no PCE layer to reinforce')
    return _busiest(layers, names, usage)


@torch.no_grad()
def _perturb_pair(tensor: torch.Tensor, a: int, b: int, noise_std: float, generator: torch.Generator) -> None:
    """Move rows a and b of a per-expert tensor apart by +-noise (std = noise_std x the tensor's std), in place.

    Opposite signs keep the pair's mean where the original was, so the soft-routed output moves only to
    second order while the copies can specialise.
    """
    if noise_std == 0 or tensor.numel() < 2:
        return
    scale = noise_std * float(tensor.float().std())
    noise = torch.randn(tensor[a].shape, generator=generator, dtype=torch.float32) * scale
    noise = noise.to(device=tensor.device, dtype=tensor.dtype)
    tensor[a] -= noise
    tensor[b] += noise


def _perturb_copies(layer: PCEConv2d, a: int, b: int, noise_std: float, generator: torch.Generator) -> None:
    """Perturb an expert and its copy: conv weights and the router entries that tell them apart."""
    _perturb_pair(layer.experts.weight.data, a, b, noise_std, generator)
    router = layer.router
    for tensor in (getattr(router, 'keys', None), getattr(getattr(router, 'fc2', None), 'weight', None),
                   getattr(router, 'anchors', None)):
        if tensor is not None:
            _perturb_pair(tensor.data, a, b, noise_std, generator)


def reinforce_experts(
        model: nn.Module,
        layers: Union[str, Sequence[str], Mapping[str, int]] = 'all',
        usage: Optional[Mapping[str, Counts]] = None,
        noise_std: float = 0.0,
        seed: int = 0,
) -> ExpertMap:
    """Duplicate one expert per chosen layer of a PCE-ResNet, in place: the copy becomes the last expert.

    With ``noise_std=0`` the output is unchanged for soft and top-1 routing (see the module docstring for why
    and for top-k). Soft-routed copies then part ways through training. Top-1-routed copies tie, and every
    patch goes to the same one of them (``torch.topk``'s first) until they differ: ``noise_std > 0`` starts
    them apart, so the pair shares the original's patches from the start (at the cost of an exact output).

    Args:
        model: a PCE-ResNet (``deepcopy`` it first to keep the original).
        layers: ``'all'`` (every layer in ``usage``, or every PCE layer) or a list of PCE layer names, whose
            busiest expert by ``usage`` is duplicated; or a dict PCE layer name -> id of the expert to duplicate.
        usage: PCE layer name -> top-1 count per expert; needed unless ``layers`` names the experts.
        noise_std: Gaussian noise, in units of each tensor's standard deviation, added to the copy and
            subtracted from the original: conv weights and router entries (keys, MLP rows, anchors).
        seed: seeds the noise.

    Returns:
        For every changed layer, the old id of each expert (the last one is the copy).
    """
    pce = _check_model(model)
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std >= 0:
        raise ValueError(f'noise_std must be a float >= 0, got {noise_std!r}')
    duplicates = _resolve_duplicates(pce, layers, usage)
    generator = torch.Generator().manual_seed(seed)
    changed = {}
    for name, expert in duplicates.items():
        layer = pce[name]
        if not layer.soft and 1 < layer.top_k:
            warnings.warn(f'{name}: with top_k={layer.top_k} routing a duplicated expert takes two of a patch\'s '
                          f'choices, so the output changes (it is unchanged for soft and top-1 routing)',
                          stacklevel=2)
        index = list(range(layer.num_experts)) + [expert]
        _reindex_layer(layer, index)
        copy_id = layer.num_experts - 1
        if layer.soft:  # the pair splits the original's probability: p/2 + p/2
            layer.logit_bias[[expert, copy_id]] += math.log(0.5)
        _perturb_copies(layer, expert, copy_id, float(noise_std), generator)
        changed[name] = index
    _record(model, pce, changed)
    return changed


def expert_counts(model: nn.Module) -> Dict[str, int]:
    """Number of experts of every PCE layer, by layer name."""
    return {name: layer.num_experts for name, layer in pce_layers(model).items()}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _limited_batches(loader: Iterable, num_images: Optional[int]):
    seen = 0
    for images, labels in loader:
        if num_images is not None:
            images, labels = images[:num_images - seen], labels[:num_images - seen]
        if len(labels) == 0:
            return
        yield images, labels
        seen += len(labels)
        if num_images is not None and seen >= num_images:
            return


@torch.no_grad()
def collect_usage(model: nn.Module, loader: Iterable, num_images: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Top-1 usage counts (int64 [e]) of every PCE layer over ``loader``'s images (up to ``num_images``), eval mode.

    The same counts as ``stats.json``'s ``usage_counts`` for the same images.
    """
    layers = pce_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no PCE layers (looked for PCEConv2d modules)')
    was_training, tracking = model.training, {name: layer.track_routing for name, layer in layers.items()}
    counts = {name: torch.zeros(layer.num_experts, dtype=torch.long) for name, layer in layers.items()}
    model.eval()
    try:
        for layer in layers.values():
            layer.track_routing = True
        for images, _ in _limited_batches(loader, num_images):
            model(images.to(_device_of(model)))
            for name, layer in layers.items():
                counts[name] += layer.routing_stats()['usage_counts']
    finally:
        model.train(was_training)
        for name, layer in layers.items():
            layer.track_routing = tracking[name]
    if all(int(c.sum()) == 0 for c in counts.values()):
        raise ValueError('the loader gave no images to count expert usage on')
    return counts


def usage_from_stats(stats: Union[str, Path, Mapping[str, Any]]) -> Dict[str, List[int]]:
    """Per-layer top-1 usage counts from a ``stats.json`` (path or dict) written by the routing analysis."""
    if not isinstance(stats, Mapping):
        from .report import read_stats
        stats = read_stats(stats)
    layers = stats.get('layers')
    if not isinstance(layers, Mapping) or any('usage_counts' not in s for s in layers.values()):
        raise ValueError('stats must be a stats.json document with layers[name]["usage_counts"] (schema version 1)')
    return {name: list(summary['usage_counts']) for name, summary in layers.items()}


def evaluate_top1(model: nn.Module, loader: Iterable, num_images: Optional[int] = None) -> float:
    """Top-1 accuracy in percent over ``loader``'s images (up to ``num_images``), in eval mode.

    Counted by the package's one evaluator (:func:`pce_timm.train.engine.evaluate`), as training and
    ``scripts/evaluate.py`` count it; the model's train / eval mode is restored afterwards.
    """
    from ..train.engine import evaluate  # on use: importing analysis does not load the training stack

    was_training = model.training
    try:
        metrics = evaluate(model, loader, progress=False, max_images=num_images)
    finally:
        model.train(was_training)
    if metrics['num_samples'] == 0:
        raise ValueError('the loader gave no images to evaluate')
    return metrics['top1']


def evaluate_surgery(before: nn.Module, after: nn.Module, loader: Iterable,
                     num_images: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """Top-1 accuracy, parameter count and experts per layer of a model before and after surgery.

    Both models see the same images (the loader must give the same batches on every pass, i.e. not shuffle).
    """
    return {
        label: {
            'top1': evaluate_top1(model, loader, num_images),
            'params': sum(p.numel() for p in model.parameters()),
            'expert_counts': expert_counts(model),
        }
        for label, model in (('before', before), ('after', after))
    }


def format_surgery_table(result: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text before/after table of :func:`evaluate_surgery`'s result."""
    from ..train.evaluation import format_table  # the package's one text table

    before, after = result['before'], result['after']
    rows = [['top-1 (%)', f"{before['top1']:.2f}", f"{after['top1']:.2f}"],
            ['params', f"{before['params']:,}", f"{after['params']:,}"]]
    rows += [[f'experts {name}', str(count), str(after['expert_counts'].get(name, '-'))]
             for name, count in before['expert_counts'].items()]
    return format_table(rows, ['', 'before', 'after'], align='<>>')

