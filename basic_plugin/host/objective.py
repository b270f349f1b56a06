"""What a plugin returns for a run, and where the host keeps it: the objective and its binding.

A plugin that is on for a run returns one :class:`Objective` from ``llava_objective``; it
holds the plugin's settings and state, and computes the plugin's loss terms and metrics
for a batch. The host binds the run's objectives to the LLaVA model itself (the same
module under PEFT/LoRA and DeepSpeed) in a :class:`Binding`, kept in a weak map, never as
an attribute of the model. No objective at all: nothing is bound, and training is
LLaVA's own forward and trainer code.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    """A plugin's part of the training loss for one run."""

    #: True when :meth:`terms` reads ``outputs.hidden_states``
    wants_hidden_states: bool

    def terms(self, model, batch, outputs, image_positions) -> tuple[Mapping[str, torch.Tensor],
                                                                     Mapping[str, torch.Tensor]]:
        """``(losses, metrics)`` for this batch: named scalar tensors, left on the device.

        Called inside the model's forward (ZeRO-3 gathers what the plugin's module calls
        use), after the language model ran once. ``losses`` are added to the loss and
        logged; ``metrics`` are only logged. Both are averaged over the steps since the
        last logging step and over ranks. Every rank must build the same graph: on a batch
        without images return zero-valued terms and make the same module calls.
        """


class Verdict(Protocol):
    """An objective's judgement at a logging step, from its optional ``review(logged)`` method."""

    message: str  # one line for the training log
    stop: bool  # end the run (with a checkpoint) after this step


class Accumulator:
    """Sums of named scalars over steps, kept on the device until a logging step.

    The one rule for every logged value: mean over the steps since the last log and over
    ranks (one all-reduce of all sums and the step count).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1

    def means(self, device=None) -> dict[str, float]:
        """The means since the last call (over ranks too), and a fresh start."""
        import torch.distributed as dist

        names = sorted(self.sums)  # the same objectives on every rank give the same names
        if not names and not (dist.is_available() and dist.is_initialized()):
            return {}
        values = [self.sums[n].reshape(()) for n in names]
        device = values[0].device if values else device
        packed = torch.stack([*values, torch.tensor(float(self.steps), device=device)]).to(torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        *sums, steps = packed.tolist()
        self.sums, self.steps = {}, 0
        return {n: s / steps for n, s in zip(names, sums)} if steps else {}


@dataclass
class StepRecord:
    """What the host's forward decided for the last training batch."""

    terms: dict = field(default_factory=dict)  # detached: lm_loss and each loss term as added
    skipped: Optional[str] = None  # "nonfinite" / "image_rows": the plugin terms were left out
    lm_finite: bool = True


@dataclass
class Binding:
    """The objectives of one run, bound to its LLaVA model, and what they produced."""

    objectives: Sequence[Objective]
    accumulator: Accumulator = field(default_factory=Accumulator)
    last_step: StepRecord = field(default_factory=StepRecord)

    @property
    def wants_hidden_states(self) -> bool:
        return any(o.wants_hidden_states for o in self.objectives)


_bindings: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def bind(model, objectives: Sequence[Objective]) -> Optional[Binding]:
    """Bind ``objectives`` to ``model`` (the LLaVA module); none unbinds it. Returns the binding."""
    for objective in objectives:
        if not isinstance(objective, Objective):
            raise TypeError(f"llava_objective returned {objective!r}: it needs wants_hidden_states and terms()")
    if not objectives:
        _bindings.pop(model, None)
        return None
    binding = Binding(tuple(objectives))
    _bindings[model] = binding
    return binding


def binding_of(model) -> Optional[Binding]:
    """The binding of ``model``, or None when no objective is active for it."""
    return _bindings.get(model)
