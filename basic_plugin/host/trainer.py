"""LLaVA's trainer, plus the plugin hooks around it and logging of the named loss terms."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from basic_plugin.host.forward import PluginForwardMixin, all_ranks_agree
from basic_plugin.host.plugins import pm
from basic_plugin.host.refusal import RunStopped


def find_plugin_model(model):
    """The module carrying the plugin forward, under any PEFT or engine wrapper."""
    for module in model.modules():
        if isinstance(module, PluginForwardMixin):
            return module
    return None


logger = logging.getLogger(__name__)


class PluginStopCallback(TrainerCallback):
    """Ends training with a checkpoint once the trainer asks for a plugin stop."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.plugin_stop_reason:
            control.should_save = True
            control.should_training_stop = True
        return control


def plugin_trainer_class(llava_trainer: type) -> type:
    """A subclass of ``llava_trainer`` that runs ``llava_model_ready`` and logs plugin terms."""

    class PluginTrainer(llava_trainer):
        def __init__(self, model=None, tokenizer=None, args=None, **kwargs):
            dataset = kwargs.get("train_dataset")
            pm.hook.llava_model_ready(model=model, tokenizer=tokenizer, training_args=args,
                                      data_args=getattr(dataset, "data_args", None))
            super().__init__(model=model, tokenizer=tokenizer, args=args, **kwargs)
            self._plugin_model = find_plugin_model(model)
            self._term_sums: dict[str, float] = {}
            self._term_count = 0
            self.plugin_skipped_total = self._skipped_in_a_row = 0
            self.lm_nonfinite_total = self._lm_nonfinite_in_a_row = 0
            self._window_steps = self._window_lm_nonfinite = 0
            self.plugin_stop_reason = None
            self.add_callback(PluginStopCallback(self))

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
            if self._plugin_model is not None:
                self._plugin_model.plugin_terms = {}
            result = super().compute_loss(model, inputs, return_outputs, *args, **kwargs)
            terms = getattr(self._plugin_model, "plugin_terms", None) if model.training else None
            if model.training:
                lm_loss = terms["lm_loss"] if terms else (result[0] if isinstance(result, tuple) else result)
                self._count_lm_loss(all_ranks_agree(bool(torch.isfinite(lm_loss.detach()).all()), lm_loss.device))
            if terms:
                for name, value in terms.items():
                    self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value)
                self._term_count += 1
                self._count_skips(getattr(self._plugin_model, "plugin_skipped", None))
            return result

        def _count_lm_loss(self, finite: bool) -> None:
            """A step whose LM loss is NaN/inf learns nothing: count it, log it, stop after too many in a row."""
            self._window_steps += 1
            if finite:
                self._lm_nonfinite_in_a_row = 0
                return
            self.lm_nonfinite_total += 1
            self._lm_nonfinite_in_a_row += 1
            self._window_lm_nonfinite += 1
            logger.warning("step %d: the language-model loss is not finite (a batch with no supervised token "
                           "left after truncation gives NaN); this step learns nothing", self.state.global_step + 1)
            limit = getattr(self.args, "plugin_max_nonfinite_steps", 20)
            if self._lm_nonfinite_in_a_row >= limit and not self.plugin_stop_reason:
                self.plugin_stop_reason = (
                    f"{self._lm_nonfinite_in_a_row} consecutive steps had a non-finite language-model loss "
                    f"(limit --plugin_max_nonfinite_steps {limit}); `--data_preflight full` finds records that "
                    "truncation leaves with no supervised token")

        def _count_skips(self, reason):
            """Bad plugin terms cost the step its auxiliary loss; too many in a row stop the run."""
            if reason is None:
                self._skipped_in_a_row = 0
                return
            self.plugin_skipped_total += 1
            self._skipped_in_a_row += 1
            logger.warning("step %d: plugin loss terms left out (%s); training on the LM loss alone",
                           self.state.global_step + 1, reason)
            limit = getattr(self.args, "plugin_max_nonfinite_steps", 20)
            if self._skipped_in_a_row >= limit and not self.plugin_stop_reason:
                self.plugin_stop_reason = (
                    f"{self._skipped_in_a_row} consecutive steps had unusable plugin loss terms ({reason}) "
                    f"(limit --plugin_max_nonfinite_steps {limit})")

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
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
                raise RunStopped(f"stopped the run at step {step}: {self.plugin_stop_reason}. "
                                 f"Checkpoint saved in {saved} ({restart}).")
            return result

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                if self._window_steps and self._window_lm_nonfinite == self._window_steps:
                    logs["loss"] = float("nan")  # not the 0.0 the Trainer's NaN filter would log
                if self.lm_nonfinite_total:
                    logs["lm_loss_nonfinite_steps"] = self.lm_nonfinite_total
                self._window_steps = self._window_lm_nonfinite = 0
                logs.update(self._mean_terms())
                if self.plugin_skipped_total:
                    logs["plugin_skipped_steps"] = self.plugin_skipped_total
                for extra in pm.hook.llava_log_metrics(model=self._plugin_model):
                    logs.update({k: float(v) for k, v in (extra or {}).items()})
            return super().log(logs, *args, **kwargs)

        def _mean_terms(self) -> dict[str, float]:
            """Mean of each term since the last log, averaged over ranks too."""
            names = sorted(self._term_sums)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # every rank logs at the same step; agree on the names first
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, names)
                names = sorted(set().union(*gathered))
                values = torch.tensor([self._term_sums.get(n, 0.0) for n in names] + [float(self._term_count)],
                                      dtype=torch.float64, device=self.args.device)
                dist.all_reduce(values)
                sums, count = values[:-1].tolist(), values[-1].item()
            else:
                sums, count = [self._term_sums[n] for n in names], float(self._term_count)
            self._term_sums, self._term_count = {}, 0
            if count == 0:
                return {}
            return {n: s / count for n, s in zip(names, sums)}

    PluginTrainer.__name__ = PluginTrainer.__qualname__ = "PluginTrainer"
    return PluginTrainer
