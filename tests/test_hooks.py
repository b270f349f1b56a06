"""Each hook called through a real ``train()`` run of the tiny LLaVA (one test_hook_<name> per hook;
``llava_train_classes`` is exercised through a patched LLaVA in test_patches.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from basic_plugin.lab.tiny import tiny_train_args
from tests.helpers import REPO_ROOT, install_distribution, run_training, training_command, training_env

HOST = "basic_plugin.train"
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture
def example_plugin_env(tmp_path):
    """examples/projector_norm_plugin.py installed as a ``llava`` entry point, as its docstring says."""
    site = install_distribution(tmp_path / "example-site", "projector-norm-plugin",
                                entry_points={"projector-norm": "projector_norm_plugin"})
    return {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(EXAMPLES), str(site)])}


def logged(run, key):
    return [e[key] for e in run["log_history"] if "loss" in e and key in e]


def test_hook_llava_objective(tiny_llava, tiny_data_v1, tmp_path, example_plugin_env):
    """The documented example plugin, under LoRA: its objective gets the LLaVA model, its term trains."""
    out = tmp_path / "run"
    run = run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", lora=True,
                                             max_steps=2, extra=["--projector_norm", "True",
                                                                 "--projector_norm_weight", "0.5"]),
                       output_dir=out, env=example_plugin_env)
    term, raw = logged(run, "projector_norm"), logged(run, "projector_norm_raw")
    assert len(term) == 2 and all(t > 0 for t in term)
    assert term == pytest.approx([0.5 * r for r in raw], rel=1e-5)  # the weight reached the objective
    for entry in (e for e in run["log_history"] if "loss" in e):
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + entry["projector_norm"], abs=2e-4)


def test_hook_llava_plugin_arguments(tiny_llava, tiny_data_plain, tmp_path, example_plugin_env):
    """The example's flags are LLaVA flags; its other flags without its switch are refused."""
    out = tmp_path / "run"
    cmd = training_command(HOST, tiny_train_args(tiny_llava, *tiny_data_plain, out,
                                                 extra=["--projector_norm_weight", "0.5"]))
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(example_plugin_env), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "error: --projector_norm_weight 0.5: set while --projector_norm is off" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_hook_llava_validate_arguments(tiny_llava, tiny_data_plain, tmp_path, example_plugin_env):
    out = tmp_path / "run"
    cmd = training_command(HOST, tiny_train_args(tiny_llava, *tiny_data_plain, out,
                                                 extra=["--projector_norm", "True", "--projector_norm_weight", "-1"]))
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(example_plugin_env), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "error: --projector_norm_weight -1.0 is invalid" in res.stderr
    assert not out.exists()


@pytest.fixture
def tiny_dinov2(tmp_path):
    """A random DINOv2 folder (model + processor) of the tiny geometry: 56 px, 14 px patches."""
    from transformers import CLIPImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path / "dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    return folder


@pytest.fixture
def tower_plugin_env(tmp_path):
    """The lab's DINOv2 tower installed as a ``llava`` entry point, as a third-party tower plugin would be."""
    site = install_distribution(tmp_path / "tower-site", "dinov2-tower-plugin",
                                entry_points={"dinov2": "basic_plugin.lab.towers.dinov2"})
    return {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(site)]), "LLAVA_PLUGINS_TRACE": "1"}


def test_hook_llava_build_vision_tower(tiny_llava, tiny_data_plain, tmp_path, tiny_dinov2, tower_plugin_env):
    """A plugin tower (the lab's DINOv2, installed as an entry point) built through the hook inside LLaVA's train()."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *tiny_data_plain, out, max_steps=1, extra=["--basic", "True"])
    args[args.index("--vision_tower") + 1] = str(tiny_dinov2)
    run = run_training(HOST, args, output_dir=out, env=tower_plugin_env)
    assert "[llava-plugins] llava_build_vision_tower returned DinoV2VisionTower(" in run["output"]
    config = json.loads((out / "config.json").read_text())
    assert config["mm_hidden_size"] == 32  # the DINOv2 width, not CLIP's
    assert torch.isfinite(torch.tensor(logged(run, "basic_das"))).all()


# ---------------------------------------------------------------- the same hooks in process (seconds)
@pytest.fixture
def example_plugin(monkeypatch):
    """examples/projector_norm_plugin.py registered with the host's plugin manager, as its entry point would."""
    from basic_plugin.host import plugins

    monkeypatch.syspath_prepend(str(EXAMPLES))
    import projector_norm_plugin

    pm = plugins.load_plugins()
    pm.register(projector_norm_plugin, name="projector-norm")
    yield projector_norm_plugin
    pm.unregister(name="projector-norm")


def host_training_arguments(tmp_path, *flags):
    """``training_args`` as the host parses them: LLaVA's TrainingArguments plus every loaded plugin's flags."""
    import transformers
    import llava.train.train as llava_train

    from basic_plugin.host.arguments import build_training_arguments, plugin_argument_classes

    base = getattr(llava_train.TrainingArguments, "_llava_plugin_base", llava_train.TrainingArguments)
    parser = transformers.HfArgumentParser((build_training_arguments(base, plugin_argument_classes()),))
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path / "out"), "--report_to", "none",
                                                  *flags])
    return args


def test_hook_llava_plugin_arguments_in_process(example_plugin, tmp_path):
    from basic_plugin.host.plugins import pm
    from basic_plugin.host.refusal import Refusal

    assert [example_plugin.ProjectorNormArguments] in pm.hook.llava_plugin_arguments()
    args = host_training_arguments(tmp_path, "--projector_norm", "True", "--projector_norm_weight", "0.5")
    assert args.projector_norm is True and args.projector_norm_weight == 0.5 and args.basic is False
    with pytest.raises(Refusal, match=r"--projector_norm_weight 0.5: set while --projector_norm is off"):
        host_training_arguments(tmp_path, "--projector_norm_weight", "0.5")
    assert not (tmp_path / "out").exists()


def test_hook_llava_validate_arguments_in_process(example_plugin, tmp_path):
    from basic_plugin.host.refusal import Refusal

    with pytest.raises(Refusal, match=r"^--projector_norm_weight -1.0 is invalid; allowed: a number >= 0$"):
        host_training_arguments(tmp_path, "--projector_norm", "True", "--projector_norm_weight", "-1")
    assert host_training_arguments(tmp_path, "--projector_norm", "True", "--projector_norm_weight", "0").projector_norm


def test_hook_llava_objective_in_process(example_plugin, tmp_path):
    """The example's objective, from the hook, against a float64 reference of its term."""
    import types


    from basic_plugin.api import ForwardBatch, Objective
    from basic_plugin.host.plugins import pm

    def objectives(*flags):
        args = host_training_arguments(tmp_path, *flags)
        found = pm.hook.llava_objective(model=types.SimpleNamespace(), tokenizer=None, training_args=args,
                                        data_args=None)
        return [o for o in found if o is not None]

    assert objectives() == []  # off: no objective, LLaVA's own code path
    (objective,) = objectives("--projector_norm", "True", "--projector_norm_weight", "0.5")
    assert isinstance(objective, Objective) and objective.wants_hidden_states is False
    features = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    batch = ForwardBatch(input_ids=torch.zeros(3, 5, dtype=torch.long), attention_mask=None, images=None,
                         embeds_attention_mask=torch.ones(3, 8, dtype=torch.bool), position_ids=None, labels=None,
                         image_features=features)
    losses, metrics = objective.terms(None, batch, None, None)
    reference = (features.double().numpy() ** 2).sum(axis=-1).mean()
    assert losses["projector_norm"].item() == pytest.approx(0.5 * reference, rel=1e-6)
    assert metrics["projector_norm_raw"].item() == pytest.approx(reference, rel=1e-6)
    assert objective.review({"loss": 1.0}) is None  # the contract's default: nothing to say


def test_hook_llava_build_vision_tower_in_process(tiny_dinov2):
    import types

    from basic_plugin.lab.towers import register_lab_plugins
    from basic_plugin.lab.towers.dinov2 import DinoV2VisionTower

    pm = register_lab_plugins()  # the lab registers its tower with the host's manager in its own processes
    tower = pm.hook.llava_build_vision_tower(vision_tower_cfg=types.SimpleNamespace(mm_vision_tower=str(tiny_dinov2)),
                                             kwargs={"delay_load": True})
    assert isinstance(tower, DinoV2VisionTower) and not tower.is_loaded
    assert tower.hidden_size == 32 and tower.num_patches == 16  # 56 px / 14 px patches, from its config
    clip = types.SimpleNamespace(mm_vision_tower="openai/clip-vit-large-patch14-336")
    assert pm.hook.llava_build_vision_tower(vision_tower_cfg=clip, kwargs={}) is None  # LLaVA's CLIP builder answers


def test_hook_llava_train_classes_in_process(monkeypatch):
    """The host's own plugin answers a patched LLaVA's question with subclasses of LLaVA's classes (a command
    line with a plugin flag: without one it keeps LLaVA's, test_patches.py)."""
    import dataclasses
    import sys

    monkeypatch.setattr(sys, "argv", [sys.argv[0], "--output_dir", "o", "--basic", "True"])

    import llava.train.train as llava_train

    from basic_plugin.host import cpu, integration
    from basic_plugin.host.plugins import load_plugins

    originals = {name: integration._originals.get(("llava.train.train", name), getattr(llava_train, name))
                 for name in integration.HOSTED_CLASSES if hasattr(llava_train, name)}
    patched_before = cpu.cpu_workarounds_active()
    try:
        replaced = load_plugins().hook.llava_train_classes(classes=dict(originals))
        again = load_plugins().hook.llava_train_classes(classes={"TrainingArguments": replaced["TrainingArguments"]})
    finally:
        if not patched_before:
            cpu.remove_cpu_workarounds()
    assert set(replaced) == set(originals)
    for name, cls in replaced.items():
        assert issubclass(cls, originals[name]) and cls is not originals[name], name
    assert "basic" in {f.name for f in dataclasses.fields(replaced["TrainingArguments"])}
    assert replaced["LLaVATrainer"].__name__ == "PluginTrainer"
    assert again == {}  # classes that already are the host's are not replaced twice
