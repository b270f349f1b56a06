"""Whole training step (forward + backward + AdamW step) with BASIC on vs off.

The loss module alone says nothing about what a user pays per step: the step overhead,
on/off - 1, is measured on the same model and batch and compared with BASIC's analytical
FLOP share of that step (:mod:`basic_plugin.lab.bench.flops`). "On" binds BASIC's
objective to the model, "off" binds none (LLaVA's own forward). Batches are synthetic
(``bos``, prompt, image, text), and the stage is frozen as LLaVA freezes it.
"""
from __future__ import annotations

import gc
import statistics
import tempfile
import time
import types
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from basic_plugin.host.binding import bind, binding_of
from basic_plugin.lab.bench.flops import (FINETUNE_TEXT, PRETRAIN_TEXT, Workload, flop_share, llm_shape_of,
                                          tower_shape_of)
from basic_plugin.lab.bench.machine import sync
from basic_plugin.lab.bench.models import build_step_model

__all__ = ["prepare_stage", "make_step_batch", "measure_step", "measure_steps"]


def _basic_args(stage: str):
    from basic_plugin.basic.arguments import BasicArguments

    return types.SimpleNamespace(**{**asdict(BasicArguments()), "basic": True,
                                    "tune_mm_mlp_adapter": stage == "pretrain"})


def prepare_stage(model, stage: str):
    """Freeze as LLaVA does for the stage; return (BASIC's objective for it, trainable params).

    The objective is what BASIC's ``llava_objective`` hook gives a run with ``--basic True``
    and default flags; :func:`measure_step` binds it to the model for the "on" steps only.
    """
    from basic_plugin.basic import plugin as basic

    model.requires_grad_(stage == "finetune")
    model.get_model().get_vision_tower().requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad_(True)
    objective = basic.llava_objective(model=model, tokenizer=None, training_args=_basic_args(stage), data_args=None)
    if objective is None:
        raise RuntimeError(f"BASIC gave no objective for the benchmark model ({stage})")
    model.train()
    return objective, [p for p in model.parameters() if p.requires_grad]


def make_step_batch(model, batch: int, before: int, after: int, seed: int = 0, device="cpu"):
    """``batch`` samples of ``bos``, ``before - 1`` prompt tokens, the image, ``after`` text tokens."""
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    vocab = model.config.vocab_size
    tower = model.get_model().get_vision_tower()
    size = tower.config.image_size
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (batch, max(before - 1, 0)), generator=g)
    text = torch.randint(3, vocab, (batch, after), generator=g)
    bos = torch.ones(batch, 1, dtype=torch.long)
    image = torch.full((batch, 1), IMAGE_TOKEN_INDEX, dtype=torch.long)
    ids = torch.cat([bos, prefix, image, text], dim=1)
    labels = ids.clone()
    labels[:, : before + 1] = IGNORE_INDEX  # prompt and image unsupervised
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, dtype=torch.bool).to(device),
            "labels": labels.to(device),
            "images": torch.randn(batch, 3, size, size, generator=g).to(device)}


def _timed_step(model, optimizer, batch, device):
    """(wall seconds, process CPU seconds) of zero_grad + forward + backward + optimizer step."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def measure_step(model, name: str, stage: str, *, batch: int, repeats: int, device, on_tick=None) -> Dict[str, object]:
    """Median step time with BASIC off and on (interleaved), and the analytical FLOP share."""
    objective, params = prepare_stage(model, stage)
    settings = objective.settings
    model.to(device)
    before, after = PRETRAIN_TEXT if stage == "pretrain" else FINETUNE_TEXT
    data = make_step_batch(model, batch, before, after, device=device)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = {"off": [], "on": []}
    cpus = {"off": [], "on": []}
    terms_ok = True
    for r in range(repeats + 1):  # the first round warms up (optimizer state, allocator)
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):  # alternate who goes first
            bind(model, [objective] if mode == "on" else [])
            elapsed, cpu = _timed_step(model, optimizer, data, device)
            if mode == "on":  # BASIC really ran: its terms were added to the loss
                terms_ok = terms_ok and {"basic_das", "basic_sds"} <= set(binding_of(model).last_step.terms)
            if r:
                times[mode].append(elapsed)
                cpus[mode].append(cpu)
        if on_tick:
            on_tick()
    bind(model, [])
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    llm, tower = llm_shape_of(model), tower_shape_of(model)
    image_tokens = tower.tokens - 1
    wl = Workload(stage, image_tokens, before, after, settings.depth, vision_hidden=tower.hidden,
                  vocab_grad=stage == "finetune" and not settings.detach_vocab,
                  patch_weights=settings.patch_weights)
    share = flop_share(llm, tower, wl)
    return {"model": name, "stage": stage, "batch": batch, "repeats": repeats, "image_tokens": image_tokens,
            "tokens": wl.tokens, "depth": settings.depth, "hidden": llm.hidden, "layers": llm.layers,
            "vocab": llm.vocab, "off_s": off, "on_s": on, "times_off": times["off"], "times_on": times["on"],
            "cpus_off": cpus["off"], "cpus_on": cpus["on"],
            "cpu_off_s": statistics.median(cpus["off"]), "cpu_on_s": statistics.median(cpus["on"]),
            "overhead": on / off - 1.0, "overhead_min": min(times["on"]) / min(times["off"]) - 1.0,
            "overhead_cpu": statistics.median(cpus["on"]) / statistics.median(cpus["off"]) - 1.0,
            "flop_share": share["share"], "flops_step_off": share["step_off"], "flops_basic": share["basic"],
            "basic_terms_present": terms_ok}


def measure_steps(models: Sequence[str], stages: Sequence[str], *, batch: int, repeats: Callable[[str], int],
                  device, mini_dir: Optional[str], progress) -> Tuple[List[Dict[str, object]], List[str]]:
    """(one :func:`measure_step` row per model and stage, notes on the models skipped).

    Each model is built afresh per stage (in a temporary folder), so that no stage starts
    from the other's optimizer or frozen state. ``repeats(name)``: timed rounds per model.
    """
    rows: List[Dict[str, object]] = []
    notes: List[str] = []
    with tempfile.TemporaryDirectory(prefix="basic-bench-") as workdir:
        for name in models:
            for stage in stages:
                progress.set(f"step {name} {stage}")
                model, why = build_step_model(name, workdir, mini_dir)
                if model is None:
                    notes.append(f"{name}: skipped ({why})")
                    progress.note(f"[bench] {name}: skipped ({why})")
                    progress.tick(repeats(name) + 1)
                    continue
                rows.append(measure_step(model, name, stage, batch=batch, repeats=repeats(name), device=device,
                                         on_tick=progress.tick))
                del model
                gc.collect()
    return rows, notes
