"""Each hook called through a real ``train()`` run of the tiny LLaVA (one test_hook_<name> per hook;
``llava_train_classes`` is exercised through a patched LLaVA in test_patches.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from basic_plugin.lab.tiny import tiny_train_args
from tests.helpers import REPO_ROOT, run_training, training_command, training_env

HOST = "basic_plugin.train"
EXAMPLES = REPO_ROOT / "examples"


@pytest.fixture
def example_plugin_env(tmp_path):
    """examples/projector_norm_plugin.py installed as a ``llava`` entry point, as its docstring says."""
    site = tmp_path / "example-site"
    info = site / "projector_norm_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: projector-norm-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[llava]\nprojector-norm = projector_norm_plugin\n")
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


def test_hook_llava_build_vision_tower(tiny_llava, tiny_data_plain, tmp_path, tiny_dinov2):
    """A plugin tower (the lab's DINOv2) built through the hook inside LLaVA's train()."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *tiny_data_plain, out, max_steps=1, extra=["--basic", "True"])
    args[args.index("--vision_tower") + 1] = str(tiny_dinov2)
    run = run_training(HOST, args, output_dir=out, env={"LLAVA_PLUGINS_TRACE": "1"})
    assert "[llava-plugins] llava_build_vision_tower returned DinoV2VisionTower(" in run["output"]
    config = json.loads((out / "config.json").read_text())
    assert config["mm_hidden_size"] == 32  # the DINOv2 width, not CLIP's
    assert torch.isfinite(torch.tensor(logged(run, "basic_das"))).all()
