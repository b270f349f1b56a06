"""LLaVA's trainer, plus the run's plugin objectives: bound once, logged by one rule, guarded.

:class:`PluginTrainerMixin` goes in front of LLaVA's ``LLaVATrainer`` (as
:class:`basic_plugin.host.forward.PluginForwardMixin` goes in front of its model classes):
:func:`plugin_trainer_class` builds that subclass (a class already hosted is returned as
it is). With no objective for the run, every method below defers to LLaVA's own (the
exceptions, kept for every run through the host, are two LoRA fixes under DeepSpeed: empty
optimizer groups are dropped (``--mm_projector_lr``), and a resume loads the module state
non-strictly, :func:`lora_resume_under_deepspeed`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

from transformers import TrainerCallback

from basic_plugin.host.arguments import plugin_argument_classes
from basic_plugin.host.binding import StepRecord, bind
from basic_plugin.host.dataset import SKIPPED_KEY
from basic_plugin.host.forward import PluginForwardMixin
from basic_plugin.host.plugins import pm
from basic_plugin.host.progress import progress_callback
from basic_plugin.host.refusal import RunInterrupted, RunStopped
from basic_plugin.host.resume import plugin_settings, write_settings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def lora_resume_under_deepspeed(trainer):
    """Inside the block, a DeepSpeed resume of a PEFT (LoRA) model loads its module state non-strictly.

    transformers 4.37 resumes with DeepSpeed's strict ``load_checkpoint``, but a LoRA run's
    DeepSpeed checkpoint holds the trainable weights only (LoRA, projector), so every LoRA
    resume fails with "Missing key(s) ... base_layer.weight" (LLaVA issue #1200). The frozen
    weights are the ones just loaded from ``--model_name_or_path``; later transformers load
    PEFT models exactly so (``load_module_strict=False``).
    """
    import transformers.trainer as hf_trainer

    original = hf_trainer.deepspeed_load_checkpoint
    if not hf_trainer._is_peft_model(trainer.model):
        yield
        return

    def deepspeed_load_checkpoint(engine, checkpoint_path, *args, **kwargs):
        engine.load_checkpoint = functools.partial(type(engine).load_checkpoint, engine, load_module_strict=False)
        try:
            return original(engine, checkpoint_path, *args, **kwargs)
        finally:
            del engine.load_checkpoint

    hf_trainer.deepspeed_load_checkpoint = deepspeed_load_checkpoint
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


def llava_model_of(model):
    """The LLaVA module carrying the plugin forward, under any PEFT or engine wrapper."""
    for module in model.modules():
        if isinstance(module, PluginForwardMixin):
            return module
    return None


@dataclass
class Streak:
    """Bad training steps of one kind: in all, in a row, and in the current logging window."""

    total: int = 0
    in_a_row: int = 0
    in_window: int = 0

    def add(self, bad: bool) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        self.in_window += 1


class PluginStopCallback(TrainerCallback):
    """Ends training with a checkpoint once the trainer asks for a plugin stop."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        binding = self.trainer.plugin_binding
        if binding.interrupt_agreed and not self.trainer.plugin_stop_reason:  # the same step on every rank
            self.trainer.plugin_stop_reason = "interrupted (Ctrl-C)"
            self.trainer.interrupted = True
        if self.trainer.plugin_stop_reason:
            control.should_save = True
            control.should_training_stop = True
        return control


class PluginTrainerMixin:
    """Asks the plugins for their objectives, binds them to the LLaVA model, logs and guards their terms."""

    def __init__(self, model=None, tokenizer=None, args=None, **kwargs):
        dataset = kwargs.get("train_dataset")
        if hasattr(dataset, "skip_bad_records"):  # the host's dataset: skip a record that fails to load, or name it
            dataset.skip_bad_records = bool(getattr(args, "skip_bad_records", False))
        self.data_skipped = 0  # records skipped at load time (--skip_bad_records), on this rank
        llava_model = llava_model_of(model) if model is not None else None
        objectives = [o for o in pm.hook.llava_objective(
            model=llava_model if llava_model is not None else model, tokenizer=tokenizer, training_args=args,
            data_args=getattr(dataset, "data_args", None)) if o is not None]
        if objectives and llava_model is None:
            raise RuntimeError(f"a plugin is on, but {type(model).__name__} has no plugin forward (the host "
                               "supports LLaVA-Llama and LLaVA-Mistral)")
        self.plugin_binding = bind(llava_model, objectives) if llava_model is not None else None
        super().__init__(model=model, tokenizer=tokenizer, args=args, **kwargs)
        self.lm_nonfinite = Streak()  # steps whose language-model loss was NaN/inf
        self.plugin_skipped = Streak()  # steps whose plugin terms were left out
        self.window_steps = 0  # training steps since the last logging step
        self.steps_counted = 0  # training steps (micro-batches) in all
        self.plugin_stop_reason = None
        self.interrupted = False
        if self.plugin_binding is not None:
            self.add_callback(PluginStopCallback(self))
        progress = progress_callback()  # only when the launcher asked (BASIC_LLAVA_PROGRESS)
        if progress is not None:
            self.add_callback(progress)

    def create_optimizer(self):
        """LLaVA's parameter groups without the empty ones.

        With LoRA and ``--mm_projector_lr`` (LLaVA's finetune_lora.sh) one group is
        empty; DeepSpeed drops it after the LR scheduler has counted it, and the first
        scheduler step fails. Dropping it here keeps both in step.
        """
        optimizer = super().create_optimizer()
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, *args, **kwargs):
        self.data_skipped += int(inputs.pop(SKIPPED_KEY, 0) or 0)  # the collator's count, not for the model
        if self.plugin_binding is not None:  # a batch the plugin path does not take leaves no stale record
            self.plugin_binding.last_step = StepRecord()
        result = super().compute_loss(model, inputs, return_outputs, *args, **kwargs)
        if self.plugin_binding is not None and model.training:
            step = self.plugin_binding.last_step
            self._count_lm_loss(step.lm_finite)
            self._count_skips(step.skipped)
        return result

    def _stop_after(self, streak: Streak, what: str, hint: str = "") -> None:
        """Ask for a stop once ``streak`` has ``--plugin_max_nonfinite_steps`` bad steps in a row (the first
        reason given stays)."""
        limit = getattr(self.args, "plugin_max_nonfinite_steps", 20)
        if streak.in_a_row >= limit and not self.plugin_stop_reason:
            self.plugin_stop_reason = (f"{streak.in_a_row} consecutive steps had {what} "
                                       f"(limit --plugin_max_nonfinite_steps {limit}){hint}")

    def _count_lm_loss(self, finite: bool) -> None:
        """A step whose LM loss is NaN/inf learns nothing: count it, log it, stop after too many in a row."""
        self.window_steps += 1
        self.steps_counted += 1
        self.lm_nonfinite.add(not finite)
        if finite:
            return
        logger.warning("step %d: the language-model loss is not finite (a batch with no supervised token "
                       "left after truncation gives NaN); this step learns nothing", self.state.global_step + 1)
        self._stop_after(self.lm_nonfinite, "a non-finite language-model loss",
                         "; `--data_preflight full` finds records that truncation leaves with no supervised token")

    def _count_skips(self, reason):
        """Bad plugin terms cost the step its auxiliary loss; too many in a row stop the run."""
        self.plugin_skipped.add(reason is not None)
        if reason is None:
            return
        logger.warning("step %d: plugin loss terms left out (%s); training on the LM loss alone",
                       self.state.global_step + 1, reason)
        self._stop_after(self.plugin_skipped, f"unusable plugin loss terms ({reason})")

    def _review(self, logs):
        """Each objective's ``review(logged)`` judges the logging step (the same on every rank)."""
        for objective in self.plugin_binding.objectives:
            verdict = objective.review(dict(logs))
            if verdict is None:
                continue
            if self.args.process_index == 0:
                print(f"[basic-llava] step {self.state.global_step}: {verdict.message}", flush=True)
            logs["plugin_guard_warnings"] = logs.get("plugin_guard_warnings", 0) + 1
            if verdict.stop and not self.plugin_stop_reason:
                self.plugin_stop_reason = verdict.message
                # the Trainer saves right after logging: checkpoint and stop at this very step
                self.control.should_save = self.control.should_training_stop = True

    def _save_checkpoint(self, model, trial, metrics=None):
        """With a plugin on, the plugin settings go next to every checkpoint (:mod:`basic_plugin.host.resume`),
        written before the checkpoint's own files: a run killed while saving never leaves a checkpoint
        whose ``trainer_state.json`` (what a resume reads) is there without them."""
        if self.plugin_binding is not None and self.is_world_process_zero():
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            write_settings(folder, plugin_settings(self.args, plugin_argument_classes()))
        return super()._save_checkpoint(model, trial, metrics)

    def _catch_interrupts(self):
        """With a plugin on: the first Ctrl-C ends training after the current step (every rank alike, with a
        checkpoint), a second one at once. Returns the function that puts the previous handler back."""
        import signal
        import sys
        import threading

        if self.plugin_binding is None or threading.current_thread() is not threading.main_thread():
            return lambda: None
        binding = self.plugin_binding
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if binding.interrupt_requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            binding.interrupt_requested = True
            print("[basic-llava] Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: at once, "
                  "without one)", file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def _nothing_learnt(self) -> bool:
        """Every training step had a non-finite language-model loss."""
        return self.plugin_binding is not None and self.steps_counted > 0 \
            and self.lm_nonfinite.total == self.steps_counted

    def train(self, *args, **kwargs):
        restore = self._catch_interrupts()
        try:
            with lora_resume_under_deepspeed(self):
                result = super().train(*args, **kwargs)
        finally:
            restore()
        if self.plugin_stop_reason:
            step = self.state.global_step
            saved = os.path.join(self.args.output_dir, f"checkpoint-{step}")
            restart = "the same command resumes from it"
            if getattr(self.args, "tune_mm_mlp_adapter", False):
                # LLaVA's pretraining checkpoints hold only mm_projector.bin and cannot be resumed;
                # renamed, the folder does not block a restart of the same command
                kept = os.path.join(self.args.output_dir, f"stopped-at-step-{step}")
                if self.args.process_index == 0 and os.path.isdir(saved):
                    if os.path.isdir(kept):
                        import shutil

                        shutil.rmtree(kept)
                    os.replace(saved, kept)
                saved = kept
                restart = ("the same command starts afresh in this folder; its mm_projector.bin can seed "
                           "--pretrain_mm_mlp_adapter")
            stopped = RunInterrupted if self.interrupted else RunStopped
            raise stopped(f"stopped the run at step {step}: {self.plugin_stop_reason}. "
                          f"Checkpoint saved in {saved} ({restart}).")
        if self._nothing_learnt():
            raise RunStopped(f"every one of the {self.steps_counted} training steps had a non-finite language-model "
                             "loss, so the run learnt nothing (no model saved); `--data_preflight full` finds records "
                             "that truncation leaves with no supervised token")
        return result

    def _skipped_records(self) -> int:
        """Records skipped at load time so far, over every rank (one all-reduce, on every rank alike)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.data_skipped
        count = torch.tensor([self.data_skipped], dtype=torch.int64, device=self.args.device)
        dist.all_reduce(count)
        return int(count.item())

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and getattr(self.args, "skip_bad_records", False):
            skipped = self._skipped_records()
            if skipped:
                logs["data_skipped_records"] = skipped
        if "train_loss" in logs and self._nothing_learnt():
            logs["train_loss"] = float("nan")  # not the 0.0 of the Trainer's NaN filter
        if "loss" in logs and self.plugin_binding is not None:
            if self.window_steps and self.lm_nonfinite.in_window == self.window_steps:
                logs["loss"] = float("nan")  # not the 0.0 the Trainer's NaN filter would log
            if self.lm_nonfinite.total:
                logs["lm_loss_nonfinite_steps"] = self.lm_nonfinite.total
            self.window_steps = self.lm_nonfinite.in_window = self.plugin_skipped.in_window = 0
            logs.update(self.plugin_binding.accumulator.means(device=self.args.device))
            self._review(logs)
            if self.plugin_skipped.total:
                logs["plugin_skipped_steps"] = self.plugin_skipped.total
        return super().log(logs, *args, **kwargs)


def plugin_trainer_class(llava_trainer: type) -> type:
    """``llava_trainer`` with :class:`PluginTrainerMixin` in front (class name ``PluginTrainer``)."""
    if issubclass(llava_trainer, PluginTrainerMixin):
        return llava_trainer
    return type("PluginTrainer", (PluginTrainerMixin, llava_trainer), {
        "__module__": __name__, "__qualname__": "PluginTrainer",
        "__doc__": f"{llava_trainer.__name__} with basic-llava's plugin objectives, logging and guards.",
    })
