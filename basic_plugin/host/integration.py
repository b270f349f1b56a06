"""The seams into an unmodified, installed ``llava``: explicit, reversible, idempotent.

``apply_plugin_host()`` rebinds, in ``llava.train.train`` (where ``train()`` looks
them up at call time), the three argument classes (plugin flags and early
validation), the model classes
(plugin losses inside forward), ``LLaVATrainer`` (hooks and logging) and
``make_supervised_data_module`` (a record whose image fails to load named or skipped); and in
``llava.model.llava_arch``, ``build_vision_tower`` (plugin vision towers).
``remove_plugin_host()`` puts every original back.
"""
from __future__ import annotations

import importlib

from basic_plugin.host.arguments import ParseRecord, build_training_arguments, recording
from basic_plugin.host.dataset import hosted_data_module
from basic_plugin.host.forward import with_plugin_forward
from basic_plugin.host.plugins import load_plugins, pm
from basic_plugin.host.preflight import run_preflight
from basic_plugin.host.trainer import plugin_trainer_class

_originals: dict[tuple[str, str], object] = {}


def _swap(module_name: str, attr: str, new) -> None:
    module = importlib.import_module(module_name)
    key = (module_name, attr)
    if key not in _originals:
        _originals[key] = getattr(module, attr)
    setattr(module, attr, new)


def plugin_vision_tower_builder(original):
    """``build_vision_tower`` that asks the plugins first, then LLaVA."""

    def build_vision_tower(vision_tower_cfg, **kwargs):
        tower = pm.hook.llava_build_vision_tower(vision_tower_cfg=vision_tower_cfg, kwargs=kwargs)
        return tower if tower is not None else original(vision_tower_cfg, **kwargs)

    build_vision_tower._llava_plugin_original = original
    return build_vision_tower


def routed_llama_class(llama_cls: type, mistral_cls: type | None) -> type:
    """LLaVA-Llama with the plugin forward; ``from_pretrained`` of a Mistral checkpoint gives LLaVA-Mistral.

    LLaVA-1.5's ``train()`` always loads ``LlavaLlamaForCausalLM``; routing by the
    checkpoint's ``model_type`` lets the same script train ``llava_mistral``.
    """
    plugin_llama = with_plugin_forward(llama_cls)
    if mistral_cls is None or "from_pretrained" in plugin_llama.__dict__:
        return plugin_llama
    plugin_mistral = with_plugin_forward(mistral_cls)
    llama_from_pretrained = plugin_llama.from_pretrained.__func__

    def from_pretrained(cls, path, *args, **kwargs):
        import transformers

        config = kwargs.get("config") or transformers.PretrainedConfig.get_config_dict(path)[0]
        model_type = config["model_type"] if isinstance(config, dict) else config.model_type
        if cls is plugin_llama and "mistral" in str(model_type):
            return plugin_mistral.from_pretrained(path, *args, **kwargs)
        return llama_from_pretrained(cls, path, *args, **kwargs)

    plugin_llama.from_pretrained = classmethod(from_pretrained)
    return plugin_llama


#: the training classes a plugin host replaces in ``llava.train.train``
HOSTED_CLASSES = ("ModelArguments", "DataArguments", "TrainingArguments", "LlavaLlamaForCausalLM",
                  "LlavaMistralForCausalLM", "LLaVATrainer")


def host_classes(classes: dict[str, type], *, exit_on_refusal: bool = False) -> dict[str, type]:
    """The host's replacements (name -> subclass) for LLaVA's training classes ``classes``.

    Shared by the runtime seams below and by a patched LLaVA (``basic_plugin.host.native``):
    argument classes recorded / extended with the plugin flags, validation and the data
    pre-flight (one :class:`ParseRecord` for the three; ``exit_on_refusal`` where no entry
    point of ours catches a refusal), the model classes with the plugin forward (Mistral
    routed), the plugin trainer.
    """
    base_args = classes["TrainingArguments"]
    parsed = ParseRecord()
    args_cls = build_training_arguments(base_args, preflight=run_preflight, parsed=parsed,
                                        exit_on_refusal=exit_on_refusal)
    args_cls._llava_plugin_base = base_args
    mistral = classes.get("LlavaMistralForCausalLM")
    replaced = {"TrainingArguments": args_cls}
    for name, key in (("ModelArguments", "model"), ("DataArguments", "data")):
        if name in classes:
            replaced[name] = recording(classes[name], key, parsed)
    if "LlavaLlamaForCausalLM" in classes:
        replaced["LlavaLlamaForCausalLM"] = routed_llama_class(classes["LlavaLlamaForCausalLM"], mistral)
    if mistral is not None:
        replaced["LlavaMistralForCausalLM"] = with_plugin_forward(mistral)
    if "LLaVATrainer" in classes:
        replaced["LLaVATrainer"] = plugin_trainer_class(classes["LLaVATrainer"])
    return replaced


def apply_plugin_host() -> None:
    """Install the seams (loading plugins first). Calling it twice changes nothing."""
    load_plugins()
    import llava.model.llava_arch as arch
    import llava.train.train as llava_train

    if ("llava.train.train", "TrainingArguments") in _originals:
        return
    current = {name: getattr(llava_train, name) for name in HOSTED_CLASSES if hasattr(llava_train, name)}
    for name, cls in host_classes(current).items():
        _swap("llava.train.train", name, cls)
    _swap("llava.model.llava_arch", "build_vision_tower", plugin_vision_tower_builder(arch.build_vision_tower))
    _swap("llava.train.train", "make_supervised_data_module", hosted_data_module(llava_train.make_supervised_data_module))


def remove_plugin_host() -> None:
    """Put back every original that ``apply_plugin_host`` replaced."""
    for (module_name, attr), original in list(_originals.items()):
        setattr(importlib.import_module(module_name), attr, original)
        del _originals[(module_name, attr)]


def plugin_host_applied() -> bool:
    return bool(_originals)
