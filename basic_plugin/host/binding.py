"""Where the host keeps a run's objectives: bound to the LLaVA model, with what they produced.

The host binds the run's objectives (:class:`basic_plugin.host.contract.Objective`, what
the plugins return from ``llava_objective``) to the LLaVA model itself (the same module
under PEFT/LoRA and DeepSpeed) in a :class:`Binding`, kept in a weak map, never as an
attribute of the model. No objective at all: nothing is bound, and training is LLaVA's
own forward and trainer code.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from basic_plugin.host.contract import Objective


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
            raise TypeError(f"llava_objective returned {objective!r}: an objective needs wants_hidden_states, "
                            "terms() and review() (subclass basic_plugin.api.Objective for the defaults)")
    if not objectives:
        _bindings.pop(model, None)
        return None
    binding = Binding(tuple(objectives))
    _bindings[model] = binding
    return binding


def binding_of(model) -> Optional[Binding]:
    """The binding of ``model``, or None when no objective is active for it."""
    return _bindings.get(model)
