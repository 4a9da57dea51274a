"""The three-phase PCE training schedule: what routes, and which parameter groups learn, in each phase.

A recipe lists phases; each covers some epochs (fractions allowed; the last may leave ``epochs`` out to take
the rest)::

    phases:
      - {name: stabilise, epochs: 1, routing: positional, noise: 1.0}   # A: positional routing + noise
      # - {name: stabilise, epochs: 1, routing: ema, ema_decay: 0.99}   # B: cosine keys, EMA updates
      # - {name: stabilise, epochs: 1, routing: uniform}                # C: uniform weights
      - {name: router, epochs: 3, routing: router, keys: learnable, gumbel_tau: 0.5}
      - {name: attention, routing: router, attention: true}

The model's parameters fall into five optimizer groups (:func:`.optim.param_groups`): ``experts`` (the expert convs
and the mixing conv of every PCE layer), ``router`` (router parameters: cosine keys or the MLP), ``embed``
(the patch embedding that feeds the router), ``attention`` (the deformable-attention modules) and ``rest``
(stem, dense convs, norms, head). A frozen group keeps its parameters *unchanged*: its ``lr_scale`` is 0, so
timm's scheduler gives it lr 0 and SGD/Adam/AdamW (decoupled weight decay is scaled by lr) leave it
bit-for-bit alone. ``requires_grad`` is not touched, so DDP's buckets stay valid across phase switches; a
phase that does not use the router needs DDP's ``find_unused_parameters=True`` (see
:func:`needs_unused_parameters`).

Which groups learn in a phase (override with ``train: [groups]``):

- ``experts``, ``rest``: always;
- ``router``: when ``routing: router`` and ``keys: learnable`` (the default);
- ``embed``: when ``routing: router``;
- ``attention``: when ``attention: true`` (the attention residual is gated off otherwise).

``routing``: ``router`` (the model's own router), ``positional`` (position-only logits + ``noise``),
``uniform`` (equal weights), ``ema`` (the cosine router, keys moved by EMA after every optimizer step
instead of by gradients; the same as ``routing: router, keys: ema``). ``keys``: ``learnable``, ``ema`` or
``frozen`` (cosine routers only). ``gumbel_tau``: > 0 samples routing from a Gumbel-softmax while training.
``choice`` (``token`` / ``expert``) and ``balance`` (``loss`` / ``bias``) override the model's routing
discipline and balancing for the phase (e.g. expert choice while the router is young, then token choice with
the balance bias); not in the last phase, since the saved model routes as it was built. A bias trained in
a phase that switched a ``balance: loss`` model to ``bias`` is not in that phase's checkpoints.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from pce_timm.layers import CosineRouter, pce_layers
from pce_timm.layers.pce import BALANCES, CHOICES, check_choice_balance

__all__ = [
    'GROUPS', 'ROUTING', 'KEYS', 'Phase', 'parse_phases', 'phase_at', 'apply_phase', 'needs_unused_parameters',
    'check_phases_fit_model',
]

GROUPS = ('experts', 'router', 'embed', 'attention', 'rest')  # optimizer groups (.optim.param_groups)
ROUTING = ('router', 'positional', 'uniform', 'ema')
KEYS = ('learnable', 'ema', 'frozen')
_PHASE_KEYS = ('name', 'epochs', 'routing', 'keys', 'gumbel_tau', 'noise', 'attention', 'ema_decay', 'train', 'choice',
               'balance')


@dataclass(frozen=True)
class Phase:
    """One phase of the schedule; ``start``/``end`` are in (possibly fractional) epochs."""
    name: str
    start: float
    end: float
    routing: str = 'router'
    keys: str = 'learnable'
    gumbel_tau: Optional[float] = None
    noise: Optional[float] = None
    attention: bool = False
    ema_decay: float = 0.99
    train: Optional[Tuple[str, ...]] = None
    choice: Optional[str] = None  # None: the model's own
    balance: Optional[str] = None  # None: the model's own
    trainable: Tuple[str, ...] = field(default=())

    @property
    def ema_keys(self) -> bool:
        return self.routing == 'ema' or (self.routing == 'router' and self.keys == 'ema')

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out['epochs'] = round(self.end - self.start, 6)
        out['train'] = list(self.trainable)
        for key in ('start', 'end', 'trainable'):
            out.pop(key)
        return out


def _trainable(routing: str, keys: str, attention: bool) -> Tuple[str, ...]:
    groups = ['experts', 'rest']
    if routing == 'router':
        groups.append('embed')
        if keys == 'learnable':
            groups.append('router')
    if attention:
        groups.append('attention')
    return tuple(g for g in GROUPS if g in groups)


def _check(condition: bool, where: str, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ValueError(f'{where}.{key}: got {value!r}; accepted: {accepted}')


def _parse_phase(index: int, spec: Any) -> Dict[str, Any]:
    where = f'phases[{index}]'
    if not isinstance(spec, dict):
        raise ValueError(f'{where}: each phase must be a mapping like {{name: stabilise, epochs: 1, '
                         f'routing: positional}}, got {spec!r}')
    unknown = sorted(set(spec) - set(_PHASE_KEYS))
    if unknown:
        raise ValueError(f'{where}: unknown key(s) {", ".join(map(repr, unknown))}; accepted: {", ".join(_PHASE_KEYS)}')
    routing = spec.get('routing', 'router')
    _check(routing in ROUTING, where, 'routing', routing, ', '.join(ROUTING))
    keys = spec.get('keys', 'learnable')
    _check(keys in KEYS, where, 'keys', keys, ', '.join(KEYS))
    epochs = spec.get('epochs')
    _check(epochs is None or (isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > 0),
           where, 'epochs', epochs, 'a number > 0 (fractions allowed), or empty for the remaining epochs')
    tau = spec.get('gumbel_tau')
    _check(tau is None or (isinstance(tau, (int, float)) and tau >= 0), where, 'gumbel_tau', tau, 'a number >= 0')
    noise = spec.get('noise')
    _check(noise is None or (isinstance(noise, (int, float)) and noise >= 0), where, 'noise', noise, 'a number >= 0')
    decay = spec.get('ema_decay', 0.99)
    _check(isinstance(decay, (int, float)) and 0 <= decay <= 1, where, 'ema_decay', decay, 'a number in [0, 1]')
    attention = spec.get('attention', False)
    _check(isinstance(attention, bool), where, 'attention', attention, 'true or false')
    choice, balance = spec.get('choice'), spec.get('balance')
    _check(choice is None or choice in CHOICES, where, 'choice', choice, ', '.join(CHOICES))
    _check(balance is None or balance in BALANCES, where, 'balance', balance, ', '.join(BALANCES))
    train = spec.get('train')
    if train is not None:
        train = [train] if isinstance(train, str) else train
        bad = [g for g in train if g not in GROUPS]
        _check(isinstance(train, list) and not bad, where, 'train', spec.get('train'),
               f'a list of parameter groups from {", ".join(GROUPS)}')
        train = tuple(g for g in GROUPS if g in train)
    return dict(name=str(spec.get('name', f'phase{index}')), epochs=epochs, routing=routing, keys=keys,
                gumbel_tau=None if tau is None else float(tau), noise=None if noise is None else float(noise),
                attention=attention, ema_decay=float(decay), train=train, choice=choice, balance=balance)


def parse_phases(specs: Optional[Sequence[Any]], epochs: int) -> List[Phase]:
    """Validate the recipe's ``phases`` against ``epochs`` and lay them out on the epoch axis.

    ``None`` or an empty list gives one phase over all epochs with the router and attention on.

    Raises:
        ValueError: naming the phase, the key, the bad value and what is accepted.
    """
    if specs and isinstance(specs[0], Phase):
        return list(specs)
    if not specs:
        return [Phase('train', 0.0, float(epochs), attention=True, trainable=_trainable('router', 'learnable', True))]
    if not isinstance(specs, (list, tuple)):
        raise ValueError(f'phases: got {specs!r}; accepted: a list of phase mappings')
    parsed = [_parse_phase(i, spec) for i, spec in enumerate(specs)]
    for i, spec in enumerate(parsed[:-1]):
        if spec['epochs'] is None:
            raise ValueError(f'phases[{i}].epochs: only the last phase may leave epochs empty (= the rest)')
    fixed = sum(spec['epochs'] or 0 for spec in parsed)
    if parsed[-1]['epochs'] is None:
        if fixed >= epochs:
            raise ValueError(f'phases: the fixed phases cover {fixed} epochs, leaving nothing for '
                             f'phases[{len(parsed) - 1}] within epochs={epochs}; raise epochs or shorten the phases')
        parsed[-1]['epochs'] = epochs - fixed
    elif not math.isclose(fixed, epochs, abs_tol=1e-6):
        raise ValueError(f'phases: the phases cover {fixed} epochs but epochs={epochs}; make them agree, or leave '
                         f'the last phase without epochs to take the rest')
    last = parsed[-1]
    if last['routing'] in ('positional', 'uniform'):
        raise ValueError(f'phases[{len(parsed) - 1}].routing: the last phase routes with {last["routing"]!r}, but '
                         "routing overrides are not saved with the weights; accepted for the last phase: router, "
                         "ema (to train a position-only model, set router: positional instead)")
    for key in ('choice', 'balance'):
        if last[key] is not None:
            raise ValueError(f'phases[{len(parsed) - 1}].{key}: the last phase overrides {key}, but the saved model '
                             f'routes with the {key} it was built with; set --{key} for the model instead')
    phases, start = [], 0.0
    for spec in parsed:
        end = start + spec.pop('epochs')
        train = spec['train'] or _trainable(spec['routing'], spec['keys'], spec['attention'])
        phases.append(Phase(start=start, end=end, trainable=train, **spec))
        start = end
    return phases


def phase_at(phases: Sequence[Phase], progress: float) -> Phase:
    """The phase covering ``progress`` (epochs done, fractional); the last phase past the end."""
    for phase in phases:
        if progress < phase.end - 1e-9:
            return phase
    return phases[-1]


def needs_unused_parameters(phases: Sequence[Phase]) -> bool:
    """Whether DDP must look for unused parameters: some phase routes without the router (positional/uniform)."""
    return any(phase.routing in ('positional', 'uniform') for phase in phases)


def apply_phase(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], phase: Phase) -> None:
    """Switch every PCE layer to the phase's routing / Gumbel / noise / attention and set the groups' lr scales.

    The lr scales take effect at the scheduler's next ``step``/``step_update`` (or call
    :func:`.optim.set_lr` directly).
    """
    for layer in pce_layers(model).values():
        layer.set_routing_mode('router' if phase.routing == 'ema' else phase.routing)
        layer.set_attention(phase.attention)
        if phase.gumbel_tau is not None:
            layer.gumbel_tau = phase.gumbel_tau
        if phase.noise is not None:
            layer.router_noise_std = phase.noise
        if phase.choice is not None:
            layer.choice = phase.choice
        if phase.balance is not None:
            layer.balance = phase.balance
    if optimizer is not None:
        for group in optimizer.param_groups:
            group['lr_scale'] = 1.0 if group.get('group', 'rest') in phase.trainable else 0.0


def check_phases_fit_model(phases: Sequence[Phase], model: nn.Module) -> None:
    """Fail early when a phase asks for cosine keys the model does not have, or for a choice / balance its layers
    cannot take.

    A model without PCE layers (the dense baseline) passes: the phases only change its (empty) PCE groups.
    """
    layers = pce_layers(model)
    if not layers:
        return
    has_keys = any(isinstance(layer.router, CosineRouter) for layer in layers.values())
    for i, phase in enumerate(phases):
        for layer in layers.values():
            try:
                check_choice_balance(phase.choice or layer.choice, phase.balance or layer.balance, layer.soft)
            except ValueError as e:
                raise ValueError(f'phases[{i}] ({phase.name}): {e}') from None
        if phase.ema_keys and not has_keys:
            routers = sorted({layer.router_name for layer in layers.values()})
            raise ValueError(f'phases[{i}] ({phase.name}): EMA key updates need a cosine router, but the model '
                             f'routes with {", ".join(routers)}; use routing: positional/uniform/router, or '
                             f'--router cosine')
