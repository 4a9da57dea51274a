"""Dispatch: routing (logits -> choices and weights) and the disciplines that run the experts on them.

- :mod:`.routing`: pure functions ``route``, ``expert_capacity``, ``assign_slots`` and the :class:`Routing`
  tuple every discipline reads;
- :class:`SoftDispatch`: every expert on every pixel (``top_k=None``);
- :class:`SlotDispatch`: per-expert slots of a static capacity (training; static eval under compile /
  export / meta, or with ``eval_capacity_factor``);
- :class:`SortedDispatch`: exact eval, each patch to exactly its chosen experts (eager / TorchScript);
- :class:`ExpertChoiceDispatch`: expert choice, each expert on the top-c patches it picked in every image
  (training and eval alike).

Each discipline is a parameter-free module with one ``forward(x, routing, experts[, capacity])`` that reads
a named plan of static index maps (:mod:`.plans`), cached per (geometry, batch, device). A new discipline
is another such module: its own routing -> slot map, the :class:`~.plans.SparsePlan` and the gathers of
:mod:`.slots` as they are (as :mod:`.expert_choice` does).
"""
from .expert_choice import ExpertChoiceDispatch
from .plans import PlanCache, SoftPlan, SparsePlan, is_exporting, is_tracing, soft_plan, sparse_plan
from .routing import (
    ExpertChoice,
    Routing,
    assign_slots,
    expert_capacity,
    expert_choice,
    expert_choice_capacity,
    route,
)
from .slots import SlotDispatch
from .soft import SoftDispatch
from .sorted_eval import SortedDispatch
