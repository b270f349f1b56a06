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


#: logged with the plugins' values: the share of the logging window's batches (steps x ranks) they are the mean of
IMAGE_FRACTION = "plugin_image_fraction"


class Accumulator:
    """Sums of named scalars over steps, kept on the device until a logging step.

    The rules for every logged value (one all-reduce of all sums and counts at a logging step):

    - the host's own values (``lm_loss``): the mean over every step since the last log and
      over ranks;
    - the plugins' values (their terms and metrics): the mean over the steps and ranks whose
      batch had image rows and kept its plugin terms, each such batch counting once. A
      text-only batch (LLaVA splices no image into it) or one whose terms were left out
      adds nothing; when no batch of the window counts, the plugins' values are not logged
      at that step. :data:`IMAGE_FRACTION` says which share of the window's batches counted.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}  # per name: how many batches its sum holds
        self.steps = 0
        self.counted = 0  # batches whose plugin values counted
        self.plugin_names: set[str] = set()

    def add(self, values: Mapping[str, torch.Tensor], plugin_values: Mapping[str, torch.Tensor] = None, *,
            counted: bool = True) -> None:
        """One training batch: ``values`` always count, ``plugin_values`` only when ``counted``.

        The names of ``plugin_values`` are recorded either way, so every rank all-reduces the same list.
        """
        for name, value in values.items():
            self._add(name, value.detach().float().reshape(()), 1.0)
        for name, value in (plugin_values or {}).items():
            self.plugin_names.add(name)
            value = value.detach().float().reshape(())
            self._add(name, value if counted else torch.zeros_like(value), 1.0 if counted else 0.0)
        self.steps += 1
        self.counted += int(bool(counted))

    def _add(self, name: str, value: torch.Tensor, weight: float) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self, device=None) -> dict[str, float]:
        """The means since the last call (over ranks too), and a fresh start."""
        import torch.distributed as dist

        names = sorted(self.sums)  # the same objectives on every rank give the same names
        if not names and not (dist.is_available() and dist.is_initialized()):
            return {}
        values = [self.sums[n].reshape(()) for n in names]
        device = values[0].device if values else device
        counts = torch.tensor([*(self.weights[n] for n in names), float(self.steps), float(self.counted)],
                              dtype=torch.float64, device=device)
        packed = torch.cat([torch.stack(values).to(torch.float64), counts]) if values else counts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        packed = packed.tolist()
        sums, weights, (steps, counted) = packed[:len(names)], packed[len(names):-2], packed[-2:]
        plugin = bool(self.plugin_names)
        self.sums, self.weights, self.steps, self.counted, self.plugin_names = {}, {}, 0, 0, set()
        if not steps:
            return {}
        means = {n: s / w for n, s, w in zip(names, sums, weights) if w > 0}
        if plugin:
            means[IMAGE_FRACTION] = counted / steps
        return means


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
    interrupt_requested: bool = False  # Ctrl-C reached this rank
    interrupt_agreed: bool = False  # ... some rank, as every rank learnt in the same step

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
