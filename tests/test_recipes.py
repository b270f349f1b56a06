"""scripts/recipes/llava15_basic.py: the GPU recipes, checked through their --dry-run output.

LLaVA-1.5's hyperparameters below are the values of scripts/v1_5/{pretrain,finetune,
finetune_lora}.sh at LLaVA c121f04 (with LLAVA_DIR set to a LLaVA checkout, the scripts
themselves are compared too).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVER = REPO_ROOT / "scripts" / "recipes" / "llava15_basic.py"
ZERO2 = REPO_ROOT / "basic_plugin" / "configs" / "zero2.json"
ZERO3 = REPO_ROOT / "basic_plugin" / "configs" / "zero3.json"
ZERO3_OFFLOAD = REPO_ROOT / "scripts" / "recipes" / "zero3_offload.json"

COMMON = {
    "--mm_projector_type": "mlp2x_gelu", "--mm_vision_select_layer": "-2",
    "--mm_use_im_start_end": "False", "--mm_use_im_patch_token": "False", "--bf16": "True",
    "--num_train_epochs": "1", "--per_device_eval_batch_size": "4", "--gradient_accumulation_steps": "1",
    "--evaluation_strategy": "no", "--save_strategy": "steps", "--save_total_limit": "1",
    "--weight_decay": "0.", "--warmup_ratio": "0.03", "--lr_scheduler_type": "cosine",
    "--logging_steps": "1", "--tf32": "True", "--model_max_length": "2048",
    "--gradient_checkpointing": "True", "--dataloader_num_workers": "4", "--lazy_preprocess": "True",
    "--vision_tower": "openai/clip-vit-large-patch14-336",
}
LLAVA_15 = {
    "pretrain": {**COMMON, "--version": "plain", "--tune_mm_mlp_adapter": "True",
                 "--per_device_train_batch_size": "32", "--learning_rate": "1e-3", "--save_steps": "24000"},
    "finetune": {**COMMON, "--version": "v1", "--image_aspect_ratio": "pad",
                 "--group_by_modality_length": "True", "--per_device_train_batch_size": "16",
                 "--learning_rate": "2e-5", "--save_steps": "50000"},
    "lora": {**COMMON, "--version": "v1", "--image_aspect_ratio": "pad",
             "--group_by_modality_length": "True", "--per_device_train_batch_size": "16",
             "--learning_rate": "2e-4", "--save_steps": "50000", "--lora_enable": "True",
             "--lora_r": "128", "--lora_alpha": "256", "--mm_projector_lr": "2e-5"},
}
DEPTH = {"7b": "16", "13b": "20"}


def dry(*args, env=None, check=True):
    """The driver's --dry-run --json steps (or the finished process when check=False)."""
    child = {k: v for k, v in os.environ.items()
             if k not in ("LLAVA_DIR", "LLAVA_DATA", "HOSTFILE", "OUTPUT_ROOT", "PRETRAIN_DATA",
                          "PRETRAIN_IMAGES", "FINETUNE_DATA", "FINETUNE_IMAGES", "EVAL_WORKDIR")}
    child.update(env or {})
    proc = subprocess.run([sys.executable, str(DRIVER), *args, "--dry-run", "--json"], cwd=REPO_ROOT,
                          env=child, capture_output=True, text=True, timeout=60)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def flags(argv):
    """``--flag value`` pairs after ``--module <name>``; every training flag appears once."""
    rest = argv[argv.index("--module") + 2:]
    names = [a for a in rest if a.startswith("--")]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    return {rest[i]: rest[i + 1] for i in range(0, len(rest), 2)}


def launcher_flags(argv):
    head = argv[:argv.index("--module") + 2]
    assert head[0] == "deepspeed"
    return {head[i]: head[i + 1] for i in range(1, len(head), 2)}


@pytest.mark.parametrize("size", ["7b", "13b"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune", "lora"])
def test_training_commands_have_llava15_hyperparameters_and_basic(size, stage, tmp_path):
    (step,) = dry("--size", size, "--stage", stage, env={"LLAVA_DATA": str(tmp_path / "data"),
                                                          "OUTPUT_ROOT": str(tmp_path / "ckpt")})
    f = flags(step["argv"])
    for flag, value in LLAVA_15[stage].items():
        assert f.get(flag) == value, (flag, f.get(flag), value)
    assert f["--model_name_or_path"] == f"lmsys/vicuna-{size}-v1.5"
    assert f["--deepspeed"] == str(ZERO2 if stage == "pretrain" else ZERO3)
    # BASIC: on, the paper's defaults, depth = half the layers
    assert (f["--basic"], f["--basic_depth"], f["--basic_lambda_das"], f["--basic_lambda_sds"]) == \
        ("True", DEPTH[size], "1.0", "0.01")
    data = tmp_path / "data"
    if stage == "pretrain":
        assert f["--data_path"] == str(data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json")
        assert f["--image_folder"] == str(data / "LLaVA-Pretrain" / "images")
        assert "--pretrain_mm_mlp_adapter" not in f and "--lora_enable" not in f
    else:
        assert f["--data_path"] == str(data / "llava_v1_5_mix665k.json")
        assert f["--image_folder"] == str(data)
        assert "--tune_mm_mlp_adapter" not in f
    suffix = {"pretrain": "-pretrain", "finetune": "", "lora": "-lora"}[stage]
    assert f["--output_dir"] == str(tmp_path / "ckpt" / f"llava-v1.5-{size}-basic{suffix}")
    assert launcher_flags(step["argv"]) == {"--num_gpus": "8", "--master_port": "29500",
                                            "--module": "basic_plugin.train_mem"}


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_pretrain_output_feeds_finetune_and_lora(size, tmp_path):
    steps = dry("--size", size, "--stage", "pretrain,finetune,lora", "--output-root", str(tmp_path))
    assert [s["name"] for s in steps] == ["train-pretrain", "train-finetune", "train-lora"]
    pre, fin, lora = (flags(s["argv"]) for s in steps)
    projector = str(Path(pre["--output_dir"]) / "mm_projector.bin")
    assert fin["--pretrain_mm_mlp_adapter"] == projector == lora["--pretrain_mm_mlp_adapter"]
    assert steps[1]["needs"] == [projector]
    assert len({pre["--output_dir"], fin["--output_dir"], lora["--output_dir"]}) == 3


def test_all_is_pretrain_finetune_eval_and_stages_run_in_order(tmp_path):
    steps = dry("--size", "7b", "--stage", "eval,finetune,pretrain", "--llava-dir", str(tmp_path))
    assert steps == dry("--size", "7b", "--stage", "all", "--llava-dir", str(tmp_path))
    names = [s["name"] for s in steps]
    assert names[:3] == ["train-pretrain", "train-finetune", "workspace"]


def test_hostfile_multi_node(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    pre, fin = dry("--size", "13b", "--stage", "pretrain,finetune", "--hostfile", str(hostfile),
                   "--master-addr", "node-a")
    for step, per_device in ((pre, "16"), (fin, "8")):  # 16 GPUs: LLaVA's global batch 256 / 128 kept
        head = launcher_flags(step["argv"])
        assert head["--hostfile"] == str(hostfile) and head["--master_addr"] == "node-a"
        assert "--num_gpus" not in head  # the hostfile's slots decide
        f = flags(step["argv"])
        assert (f["--per_device_train_batch_size"], f["--gradient_accumulation_steps"]) == (per_device, "1")
        assert "16 GPUs" in step["note"]
    # restricted like DeepSpeed's launcher: the first node, 4 GPUs on it
    (one,) = dry("--size", "13b", "--stage", "finetune", "--hostfile", str(hostfile), "--num-nodes", "1",
                 "--num-gpus", "4")
    head, f = launcher_flags(one["argv"]), flags(one["argv"])
    assert (head["--num_nodes"], head["--num_gpus"]) == ("1", "4")
    assert (f["--per_device_train_batch_size"], f["--gradient_accumulation_steps"]) == ("16", "2")


def test_fewer_gpus_accumulate_gradients():
    (pre,) = dry("--size", "7b", "--stage", "pretrain", "--num-gpus", "2")
    f = flags(pre["argv"])
    assert (f["--per_device_train_batch_size"], f["--gradient_accumulation_steps"]) == ("32", "4")
    assert launcher_flags(pre["argv"])["--num_gpus"] == "2"
    bad = dry("--size", "7b", "--stage", "pretrain", "--num-gpus", "3", check=False)
    assert bad.returncode != 0 and "global batch" in bad.stderr


def test_entry_points_offload_and_baseline():
    (patched,) = dry("--size", "7b", "--stage", "finetune", "--entry", "patched")
    assert launcher_flags(patched["argv"])["--module"] == "llava.train.train_mem"
    (sdpa,) = dry("--size", "7b", "--stage", "finetune", "--no-flash-attn")
    assert launcher_flags(sdpa["argv"])["--module"] == "basic_plugin.train"
    (off,) = dry("--size", "13b", "--stage", "finetune", "--offload")
    assert flags(off["argv"])["--deepspeed"] == str(ZERO3_OFFLOAD)
    refused = dry("--size", "13b", "--stage", "lora", "--offload", check=False)
    assert refused.returncode != 0 and "mm_projector_lr" in refused.stderr
    (base,) = dry("--size", "7b", "--stage", "finetune", "--no-basic")
    f = flags(base["argv"])
    assert not [k for k in f if k.startswith("--basic")]
    assert f["--output_dir"].endswith("/llava-v1.5-7b") and f["--pretrain_mm_mlp_adapter"].endswith(
        "/llava-v1.5-7b-pretrain/mm_projector.bin")


def test_deepspeed_configs():
    z2, z3, off = (json.loads(p.read_text()) for p in (ZERO2, ZERO3, ZERO3_OFFLOAD))
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    zo = off["zero_optimization"]
    assert zo["stage"] == 3
    assert zo["offload_param"]["device"] == zo["offload_optimizer"]["device"] == "cpu"
    assert isinstance(zo["stage3_prefetch_bucket_size"], int)
    assert zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert off["optimizer"]["type"] == "AdamW" and "scheduler" not in off  # the trainer's cosine
    assert off["bf16"]["enabled"] == "auto"


def test_eval_runs_llavas_scripts_in_the_workspace(tmp_path):
    llava_dir = tmp_path / "LLaVA"
    steps = dry("--size", "7b", "--stage", "eval", "--llava-dir", str(llava_dir), "--output-root",
                str(tmp_path / "ckpt"), "--benchmarks", "gqa,sqa,vqav2", "--num-gpus", "4")
    ws, *benches = steps
    workdir = tmp_path / "ckpt" / "eval" / "llava-v1.5-7b-basic"
    assert ws["name"] == "workspace" and "--make-eval-workspace" in ws["argv"]
    assert ws["argv"][ws["argv"].index("--eval-checkpoint") + 1] == str(tmp_path / "ckpt" / "llava-v1.5-7b-basic")
    # the workspace's copies of LLaVA's scripts (naming the checkpoint), run in the workspace
    assert [b["argv"] for b in benches] == [["bash", f"scripts/v1_5/eval/{n}.sh"] for n in ("gqa", "sqa", "vqav2")]
    assert all(b["cwd"] == str(workdir) for b in benches)
    gpus = [b["env"]["CUDA_VISIBLE_DEVICES"] for b in benches]
    assert gpus == ["0,1,2,3", "0", "0,1,2,3"]  # gqa and vqav2 split over the GPUs


def test_eval_of_lora_merges_first(tmp_path):
    steps = dry("--size", "13b", "--stage", "lora,eval", "--llava-dir", str(tmp_path), "--output-root",
                str(tmp_path / "ckpt"), "--benchmarks", "textvqa")
    assert [s["name"] for s in steps] == ["train-lora", "merge-lora", "workspace", "eval-textvqa"]
    merge = steps[1]["argv"]
    lora_dir = flags(steps[0]["argv"])["--output_dir"]
    assert merge[1:] == ["scripts/merge_lora_weights.py", "--model-path", lora_dir, "--model-base",
                         "lmsys/vicuna-13b-v1.5", "--save-model-path", lora_dir + "-merged"]
    ws = steps[2]["argv"]
    assert ws[ws.index("--eval-checkpoint") + 1] == lora_dir + "-merged"


def test_eval_needs_llava_dir_and_known_benchmarks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LLAVA_DIR"}
    res = subprocess.run([sys.executable, str(DRIVER), "--size", "7b", "--stage", "eval"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "LLAVA_DIR" in res.stderr and not list(tmp_path.iterdir())
    # a dry run still shows the plan, with the checkout left to fill in
    steps = dry("--size", "7b", "--stage", "eval", "--benchmarks", "gqa")
    assert steps[-1]["argv"] == ["bash", "scripts/v1_5/eval/gqa.sh"] and "$LLAVA_DIR" in steps[-2]["argv"]
    res = dry("--size", "7b", "--stage", "eval", "--llava-dir", "/x", "--benchmarks", "gqa,nope", check=False)
    assert res.returncode != 0 and "nope" in res.stderr


def test_text_dry_run_prints_shell_commands_and_runs_nothing(tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("a slots=8\n")
    out = tmp_path / "ckpt"
    res = subprocess.run([sys.executable, str(DRIVER), "--size", "13b", "--stage", "all", "--dry-run",
                          "--hostfile", str(hostfile), "--output-root", str(out), "--llava-dir", str(tmp_path / "L")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    commands = [l for l in res.stdout.splitlines() if l and not l.startswith("#")]
    comments = [l for l in res.stdout.splitlines() if l.startswith("#")]
    assert len(commands) == len(comments) == 2 + 1 + 8  # pretrain, finetune, workspace, 8 benchmarks
    train = [shlex.split(c) for c in commands if c.startswith("deepspeed ")]
    assert len(train) == 2 and all(["--hostfile", str(hostfile)] == t[1:3] for t in train)
    assert all("--basic" in t and t[t.index("--basic") + 1] == "True" for t in train)
    assert re.search(r"^cd \S+ && CUDA_VISIBLE_DEVICES=0 bash scripts/v1_5/eval/sqa\.sh$", res.stdout, re.M)
    assert not out.exists()  # nothing ran


def test_eval_workspace_keeps_outputs_local(tmp_path):
    llava = tmp_path / "LLaVA"
    ev = llava / "playground" / "data" / "eval"
    for rel, text in {"gqa/data/images/1.jpg": "img", "gqa/data/eval/eval.py": "# gqa eval",
                      "gqa/data/testdev_balanced_predictions.json": "old", "gqa/llava_gqa.jsonl": "{}",
                      "gqa/answers/x/merge.jsonl": "old", "MME/eval_tool/calculation.py": "#",
                      "MME/eval_tool/answers/old/a.txt": "old", "scienceqa/images/test/1.png": "img"}.items():
        (ev / rel).parent.mkdir(parents=True, exist_ok=True)
        (ev / rel).write_text(text)
    for d in ("scripts/v1_5/eval", "llava/eval"):
        (llava / d).mkdir(parents=True)
    (llava / "scripts" / "v1_5" / "eval" / "gqa.sh").write_text(LLAVA_LIKE_EVAL_SCRIPT)
    (llava / "scripts" / "convert_gqa_for_eval.py").write_text("# converts")
    ckpt = tmp_path / "ckpt" / "llava-v1.5-7b-basic"
    ckpt.mkdir(parents=True)
    work = tmp_path / "work"
    for _ in range(2):  # idempotent
        res = subprocess.run([sys.executable, str(DRIVER), "--make-eval-workspace", "--llava-dir", str(llava),
                              "--eval-workdir", str(work), "--eval-checkpoint", str(ckpt)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    assert not (work / "liuhaotian").exists()  # no checkpoint of any size posing as llava-v1.5-13b
    assert (work / "scripts" / "convert_gqa_for_eval.py").resolve() == (llava / "scripts" / "convert_gqa_for_eval.py")
    gqa = (work / "scripts" / "v1_5" / "eval" / "gqa.sh").read_text()
    assert f"--model-path {ckpt}" in gqa and 'CKPT="llava-v1.5-7b-basic"' in gqa and "13b" not in gqa
    assert (work / "llava").resolve() == (llava / "llava").resolve()
    wev = work / "playground" / "data" / "eval"
    assert (wev / "gqa" / "data" / "images").is_symlink() and (wev / "gqa" / "llava_gqa.jsonl").is_symlink()
    assert not (wev / "gqa" / "data").is_symlink() and not (wev / "MME" / "eval_tool").is_symlink()
    assert not (wev / "gqa" / "data" / "testdev_balanced_predictions.json").exists()
    for out in (wev / "gqa" / "answers", wev / "MME" / "eval_tool" / "answers", wev / "scienceqa" / "answers"):
        assert out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    (wev / "gqa" / "answers" / "new.jsonl").write_text("ours")  # a script writing its answers
    assert not (ev / "gqa" / "answers" / "new.jsonl").exists()
    assert (ev / "gqa" / "data" / "testdev_balanced_predictions.json").read_text() == "old"


#: the lines of LLaVA's scripts/v1_5/eval/*.sh that name the model (their shape at c121f04)
LLAVA_LIKE_EVAL_SCRIPT = """#!/bin/bash
CKPT="llava-v1.5-13b"
python -m llava.eval.model_vqa_loader \\
    --model-path liuhaotian/llava-v1.5-13b \\
    --answers-file ./playground/data/eval/gqa/answers/$SPLIT/$CKPT/merge.jsonl \\
    --conv-mode vicuna_v1
python scripts/convert_mmbench_for_submission.py --experiment llava-v1.5-13b
"""


def _recipe():
    import importlib.util

    name = "llava15_basic_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DRIVER)
        sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.parametrize("name", ["llava-v1.5-7b-basic", "llava-v1.5-13b-basic", "llava-v1.5-13b"])
def test_eval_outputs_carry_the_evaluated_checkpoints_name(tmp_path, name):
    """A 7B checkpoint is evaluated and labelled as itself, never as llava-v1.5-13b; a 13B path is not renamed twice."""
    ckpt = tmp_path / "checkpoints" / name
    text = _recipe().rewrite_eval_script(LLAVA_LIKE_EVAL_SCRIPT, ckpt)
    assert text.splitlines() == ["#!/bin/bash", f'CKPT="{name}"', "python -m llava.eval.model_vqa_loader \\",
                                 f"    --model-path {ckpt} \\",
                                 "    --answers-file ./playground/data/eval/gqa/answers/$SPLIT/$CKPT/merge.jsonl \\",
                                 "    --conv-mode vicuna_v1",
                                 f"python scripts/convert_mmbench_for_submission.py --experiment {name}"]
    assert _recipe().eval_name(tmp_path / name / "checkpoint-500") == f"{name}_checkpoint-500"  # as LLaVA names it


@pytest.mark.skipif(not os.environ.get("LLAVA_DIR"), reason="LLAVA_DIR (a LLaVA git checkout) not set")
@pytest.mark.parametrize("stage,script", [("pretrain", "pretrain"), ("finetune", "finetune"),
                                          ("lora", "finetune_lora")])
def test_same_flags_as_llavas_scripts(stage, script):
    text = (Path(os.environ["LLAVA_DIR"]) / "scripts" / "v1_5" / f"{script}.sh").read_text()
    theirs = dict(re.findall(r"(--\w+) (\"[^\"]*\"|\S+)", text.split("train_mem.py", 1)[1]))
    theirs = {k: v.strip('"') for k, v in theirs.items()}
    (step,) = dry("--size", "13b", "--stage", stage)
    ours = flags(step["argv"])
    differ = {"--deepspeed", "--model_name_or_path", "--data_path", "--image_folder", "--output_dir",
              "--pretrain_mm_mlp_adapter", "--report_to"}
    for flag, value in theirs.items():
        if flag not in differ:
            assert ours.get(flag) == value, (flag, ours.get(flag), value)
    assert set(ours) - set(theirs) <= {"--basic", "--basic_depth", "--basic_lambda_das", "--basic_lambda_sds"}
