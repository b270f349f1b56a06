"""One launcher, one progress file, one LLaVA-1.5 argument builder.

* the argument lists of the demo, the tiny model and the GPU recipes, byte for byte as they
  were before :mod:`basic_plugin.lab.llava_args` built them (the demo reuses a finished run
  only when its stored list is equal; a recipe's --dry-run prints them);
* :mod:`basic_plugin.lab.launch`: command, environment, timeout killing the process group;
* :mod:`basic_plugin.host.progress`: one JSON line per log event, read back by the launcher.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from basic_plugin.lab import launch

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "scripts" / "recipes" / "llava15_basic.py"

# -- the exact lists ----------------------------------------------------------------------------
# "{repo}" stands for the repository root (the shipped DeepSpeed configs).
PATHS = {"lm": "/m/lm", "vision": "/m/vision"}
DEMO_DATA = {"train": "/d/train.json", "image_folder": "/d/images"}
RECIPE_PATHS = ["--output-root", "/ck", "--pretrain-data", "/pd/x.json", "--pretrain-images", "/pd/img",
                "--finetune-data", "/fd/mix.json", "--finetune-images", "/fd"]

DEMO_BASIC = [
    "--model_name_or_path", "/m/lm", "--data_path", "/d/train.json", "--image_folder", "/d/images",
    "--vision_tower", "/m/vision", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
    "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--output_dir", "/r/seed0/basic",
    "--num_train_epochs", "1", "--max_steps", "100", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps",
    "1", "--model_max_length", "512", "--gradient_checkpointing", "False", "--lazy_preprocess", "True",
    "--tf32", "False", "--bf16", "False", "--report_to", "none", "--dataloader_num_workers", "0", "--seed",
    "0", "--version", "plain", "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3", "--deepspeed",
    "{repo}/basic_plugin/configs/zero2.json", "--seed", "0", "--data_seed", "0", "--seed_model_init",
    "True", "--learning_rate", "0.001", "--model_max_length", "128", "--basic", "True", "--basic_depth",
    "10",
]

DEMO_BASELINE = [
    "--model_name_or_path", "/m/lm", "--data_path", "/d/train.json", "--image_folder", "/d/images",
    "--vision_tower", "/m/vision", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
    "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--output_dir",
    "/r/seed2/baseline", "--num_train_epochs", "1", "--max_steps", "2", "--per_device_train_batch_size",
    "2", "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_strategy",
    "no", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
    "--logging_steps", "1", "--model_max_length", "512", "--gradient_checkpointing", "False",
    "--lazy_preprocess", "True", "--tf32", "False", "--bf16", "False", "--report_to", "none",
    "--dataloader_num_workers", "0", "--seed", "0", "--version", "plain", "--tune_mm_mlp_adapter", "True",
    "--learning_rate", "1e-3", "--seed", "2", "--data_seed", "2", "--seed_model_init", "True",
    "--learning_rate", "0.01", "--model_max_length", "128",
]

TINY_LORA = [
    "--model_name_or_path", "/m/lm", "--data_path", "/d/v1.json", "--image_folder", "/d/img",
    "--vision_tower", "/m/vision", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
    "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--output_dir", "/o/run",
    "--num_train_epochs", "1", "--max_steps", "3", "--per_device_train_batch_size", "1",
    "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps",
    "1", "--model_max_length", "512", "--gradient_checkpointing", "True", "--lazy_preprocess", "True",
    "--tf32", "False", "--bf16", "False", "--report_to", "none", "--dataloader_num_workers", "0", "--seed",
    "0", "--version", "v1", "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
    "--learning_rate", "2e-4", "--pretrain_mm_mlp_adapter", "/p/mm_projector.bin", "--lora_enable", "True",
    "--lora_r", "8", "--lora_alpha", "16", "--mm_projector_lr", "2e-05", "--deepspeed",
    "{repo}/basic_plugin/configs/zero3.json", "--basic", "True",
]

TINY_FINETUNE = [
    "--model_name_or_path", "/m/lm", "--data_path", "/d/v1.json", "--image_folder", "/d/img",
    "--vision_tower", "/m/vision", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
    "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--output_dir", "/o/run",
    "--num_train_epochs", "1", "--max_steps", "4", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps",
    "1", "--model_max_length", "64", "--gradient_checkpointing", "False", "--lazy_preprocess", "True",
    "--tf32", "False", "--bf16", "False", "--report_to", "none", "--dataloader_num_workers", "0", "--seed",
    "0", "--version", "v1", "--image_aspect_ratio", "pad", "--group_by_modality_length", "True",
    "--learning_rate", "2e-5",
]

TINY_PRETRAIN_LORA = [
    "--model_name_or_path", "/m/lm", "--data_path", "/d/p.json", "--image_folder", "/d/img",
    "--vision_tower", "/m/vision", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2",
    "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--output_dir", "/o/run",
    "--num_train_epochs", "1", "--max_steps", "4", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "1", "--save_strategy", "no",
    "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps",
    "1", "--model_max_length", "512", "--gradient_checkpointing", "True", "--lazy_preprocess", "True",
    "--tf32", "False", "--bf16", "False", "--report_to", "none", "--dataloader_num_workers", "0", "--seed",
    "0", "--version", "plain", "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3", "--lora_enable",
    "True", "--lora_r", "8", "--lora_alpha", "16", "--deepspeed", "/x/ds.json",
]

RECIPE_PRETRAIN = [
    "deepspeed", "--num_gpus", "8", "--master_port", "29500", "--module", "basic_plugin.train_mem",
    "--deepspeed", "{repo}/basic_plugin/configs/zero2.json", "--model_name_or_path",
    "lmsys/vicuna-7b-v1.5", "--data_path", "/pd/x.json", "--image_folder", "/pd/img", "--version", "plain",
    "--tune_mm_mlp_adapter", "True", "--save_steps", "24000", "--learning_rate", "1e-3", "--vision_tower",
    "openai/clip-vit-large-patch14-336", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer",
    "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--bf16", "True",
    "--num_train_epochs", "1", "--per_device_eval_batch_size", "4", "--evaluation_strategy", "no",
    "--save_strategy", "steps", "--save_total_limit", "1", "--weight_decay", "0.", "--warmup_ratio",
    "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True",
    "--model_max_length", "2048", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4",
    "--lazy_preprocess", "True", "--output_dir", "/ck/llava-v1.5-7b-basic-pretrain",
    "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1", "--report_to", "wandb",
    "--basic", "True", "--basic_depth", "16", "--basic_lambda_das", "1.0", "--basic_lambda_sds", "0.01",
]

RECIPE_FINETUNE = [
    "deepspeed", "--num_gpus", "8", "--master_port", "29500", "--module", "basic_plugin.train_mem",
    "--deepspeed", "{repo}/basic_plugin/configs/zero3.json", "--model_name_or_path",
    "lmsys/vicuna-7b-v1.5", "--data_path", "/fd/mix.json", "--image_folder", "/fd",
    "--pretrain_mm_mlp_adapter", "/ck/llava-v1.5-7b-basic-pretrain/mm_projector.bin", "--version", "v1",
    "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--save_steps", "50000",
    "--learning_rate", "2e-5", "--vision_tower", "openai/clip-vit-large-patch14-336",
    "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end",
    "False", "--mm_use_im_patch_token", "False", "--bf16", "True", "--num_train_epochs", "1",
    "--per_device_eval_batch_size", "4", "--evaluation_strategy", "no", "--save_strategy", "steps",
    "--save_total_limit", "1", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type",
    "cosine", "--logging_steps", "1", "--tf32", "True", "--model_max_length", "2048",
    "--gradient_checkpointing", "True", "--dataloader_num_workers", "4", "--lazy_preprocess", "True",
    "--output_dir", "/ck/llava-v1.5-7b-basic", "--per_device_train_batch_size", "16",
    "--gradient_accumulation_steps", "1", "--report_to", "wandb", "--basic", "True", "--basic_depth", "16",
    "--basic_lambda_das", "1.0", "--basic_lambda_sds", "0.01",
]

RECIPE_LORA = [
    "deepspeed", "--num_gpus", "8", "--master_port", "29500", "--module", "basic_plugin.train_mem",
    "--deepspeed", "{repo}/basic_plugin/configs/zero3.json", "--model_name_or_path",
    "lmsys/vicuna-13b-v1.5", "--data_path", "/fd/mix.json", "--image_folder", "/fd",
    "--pretrain_mm_mlp_adapter", "/ck/llava-v1.5-13b-basic-pretrain/mm_projector.bin", "--lora_enable",
    "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr", "2e-5", "--version", "v1",
    "--image_aspect_ratio", "pad", "--group_by_modality_length", "True", "--save_steps", "50000",
    "--learning_rate", "2e-4", "--vision_tower", "openai/clip-vit-large-patch14-336",
    "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end",
    "False", "--mm_use_im_patch_token", "False", "--bf16", "True", "--num_train_epochs", "1",
    "--per_device_eval_batch_size", "4", "--evaluation_strategy", "no", "--save_strategy", "steps",
    "--save_total_limit", "1", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type",
    "cosine", "--logging_steps", "1", "--tf32", "True", "--model_max_length", "2048",
    "--gradient_checkpointing", "True", "--dataloader_num_workers", "4", "--lazy_preprocess", "True",
    "--output_dir", "/ck/llava-v1.5-13b-basic-lora", "--per_device_train_batch_size", "16",
    "--gradient_accumulation_steps", "1", "--report_to", "wandb", "--basic", "True", "--basic_depth", "20",
    "--basic_lambda_das", "1.0", "--basic_lambda_sds", "0.01",
]


def _expand(flags):
    return [a.replace("{repo}", str(REPO_ROOT)) for a in flags]


def test_demo_arguments_are_unchanged():
    from basic_plugin.lab.demo.run import train_args

    basic = train_args(PATHS, DEMO_DATA, Path("/r/seed0/basic"), arm="basic", steps=100, batch=8, seed=0, lr=1e-3,
                       deepspeed=True, basic_flags=["--basic_depth", "10"])
    baseline = train_args(PATHS, DEMO_DATA, Path("/r/seed2/baseline"), arm="baseline", steps=2, batch=2, seed=2,
                          lr=0.01, deepspeed=False)
    assert basic == _expand(DEMO_BASIC)
    # the baseline arm is LLaVA's list plus BASIC in monitor-only mode (lambdas 0: same training, same curves)
    assert baseline == _expand(DEMO_BASELINE) + ["--basic", "True", "--basic_lambda_das", "0", "--basic_lambda_sds", "0"]


def test_tiny_arguments_are_unchanged():
    from basic_plugin.lab.tiny import tiny_train_args

    assert tiny_train_args(PATHS, "/d/v1.json", "/d/img", "/o/run", stage="finetune", max_steps=3, batch=1, lora=True,
                           deepspeed_config="zero3", pretrain_mm_mlp_adapter="/p/mm_projector.bin",
                           mm_projector_lr=2e-5, extra=["--basic", "True"]) == _expand(TINY_LORA)
    assert tiny_train_args(PATHS, "/d/v1.json", "/d/img", "/o/run", stage="finetune", gradient_checkpointing=False,
                           model_max_length=64) == _expand(TINY_FINETUNE)
    assert tiny_train_args(PATHS, "/d/p.json", "/d/img", "/o/run", lora=True,
                           deepspeed_config="/x/ds.json") == _expand(TINY_PRETRAIN_LORA)
    with pytest.raises(ValueError, match="stage"):
        tiny_train_args(PATHS, "/d/p.json", "/d/img", "/o/run", stage="lora")


@pytest.mark.parametrize("stage,size,expected", [("pretrain", "7b", RECIPE_PRETRAIN),
                                                 ("finetune", "7b", RECIPE_FINETUNE),
                                                 ("lora", "13b", RECIPE_LORA)])
def test_recipe_commands_are_unchanged(stage, size, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "REPORT_TO",
                                                            "VISION_TOWER", "BASE_MODEL", "EXTRA_TRAIN_ARGS")}
    proc = subprocess.run([sys.executable, str(RECIPE), "--size", size, "--stage", stage, *RECIPE_PATHS,
                           "--dry-run", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (step,) = json.loads(proc.stdout)
    assert step["argv"] == _expand(expected)


def test_recipe_runs_on_the_standard_library_alone(tmp_path):
    """The recipe loads the builder by path: a python without the package's dependencies runs it."""
    proc = subprocess.run([sys.executable, "-S", "-s", str(RECIPE), "--size", "7b", "--stage", "pretrain",
                           *RECIPE_PATHS, "--dry-run"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--basic True" in proc.stdout


def test_builder_follows_llavas_scripts():
    from basic_plugin.lab.llava_args import LLAVA15, llava15_args

    args = llava15_args("lora", model="lmsys/vicuna-13b-v1.5", data_path="d.json", image_folder="img",
                        vision_tower="openai/clip-vit-large-patch14-336", output_dir="out", deepspeed="zero3",
                        overrides={"--report_to": "none", "--save_total_limit": None, "--seed": 3})
    flags = dict(zip(args[::2], args[1::2]))
    # scripts/v1_5/finetune_lora.sh opens with the LoRA flags, then --deepspeed, --model_name_or_path, --version
    assert args[:12] == ["--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr",
                         "2e-5", "--deepspeed", str(REPO_ROOT / "basic_plugin" / "configs" / "zero3.json"),
                         "--model_name_or_path", "lmsys/vicuna-13b-v1.5"]
    assert flags["--learning_rate"] == "2e-4" and flags["--report_to"] == "none" and flags["--seed"] == "3"
    assert "--save_total_limit" not in flags and len(flags) == len(args) // 2
    assert LLAVA15["pretrain"]["--per_device_train_batch_size"] == "32"
    with pytest.raises(ValueError, match="stage"):
        llava15_args("eval", model="m", data_path="d", image_folder="i", vision_tower="v", output_dir="o")


# -- the launcher -------------------------------------------------------------------------------
def test_command_and_environment(monkeypatch):
    assert launch.command("m.x", ["--a", 1]) == [sys.executable, "-m", "m.x", "--a", "1"]
    assert launch.command("m.x", ["--a"], ranks=2, master_port=1234) == [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "1234",
        "--module", "m.x", "--a"]
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.setenv(var, "7")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    env = launch.environment({"EXTRA": 5}, threads=3)
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & env.keys()
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1" and env["WANDB_MODE"] == "disabled"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" and env["EXTRA"] == "5"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(launch.REPO_ROOT)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    many = launch.environment(ranks=64)
    assert many["OMP_NUM_THREADS"] == "1"  # N ranks share the cores
    assert "OMP_NUM_THREADS" not in launch.environment(ranks=1)


def _write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


def test_timeout_kills_the_whole_process_group(tmp_path):
    # a "launcher" that starts a "rank" and hangs, like DeepSpeed's runner waiting on its ranks
    _write_module(tmp_path, "hang_launcher", """
        import subprocess, sys, time
        rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open(sys.argv[1], "w").write(str(rank.pid))
        print("rank started", flush=True)
        time.sleep(300)
    """)
    pid_file = tmp_path / "rank.pid"
    start = time.monotonic()
    with pytest.raises(launch.TrainingFailed, match="timed out") as failure:
        launch.run("hang_launcher", [str(pid_file)], output_dir=tmp_path / "out", timeout=5,
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"})
    assert time.monotonic() - start < 60
    assert "rank started" in str(failure.value) and "hang_launcher" in str(failure.value)
    pid = int(pid_file.read_text())
    for _ in range(50):  # the rank was killed with its launcher (reaped by init soon after)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"rank {pid} outlived the timeout")
    assert not (tmp_path / "out").exists()


def test_failure_carries_the_output_tail(tmp_path):
    _write_module(tmp_path, "fails", """
        import sys
        print("something useful went wrong", flush=True)
        sys.exit(3)
    """)
    with pytest.raises(launch.TrainingFailed, match="exited with code 3") as failure:
        launch.run("fails", [], output_dir=tmp_path / "out", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"})
    assert "something useful went wrong" in str(failure.value)
    assert failure.value.returncode == 3 and (tmp_path / "out.log").is_file()


def test_output_dir_must_agree(tmp_path):
    with pytest.raises(ValueError, match="differs"):
        launch.run("x", ["--output_dir", str(tmp_path / "a")], output_dir=tmp_path / "b")


# -- the progress file --------------------------------------------------------------------------
def test_progress_callback_writes_one_json_line_per_log_on_the_main_process(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    from basic_plugin.host.progress import PROGRESS_ENV, ProgressCallback, progress_callback

    assert launch.PROGRESS_ENV == PROGRESS_ENV
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_callback() is None
    path = tmp_path / "deeper" / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_ENV, str(path))
    callback = progress_callback()
    assert isinstance(callback, ProgressCallback) and callback.path == path

    state = TrainerState(max_steps=5, global_step=2, is_world_process_zero=True)
    callback.on_log(None, state, TrainerControl(), logs={"loss": 1.5, "lm_loss": math.nan, "step": 99, "note": "x"})
    state.global_step = 3
    callback.on_log(None, state, TrainerControl(), logs={"loss": 1.25})
    other_rank = TrainerState(max_steps=5, global_step=3, is_world_process_zero=False)
    callback.on_log(None, other_rank, TrainerControl(), logs={"loss": 9.0})

    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 2, "max_steps": 5, "loss": 1.5, "lm_loss": None, "note": "x"},
        {"step": 3, "max_steps": 5, "loss": 1.25},
    ]
    assert launch.read_progress(path) == [json.loads(line) for line in lines]
    with open(path, "a") as f:  # a line still being written is not read
        f.write('{"step": 4, "max')
    assert len(launch.read_progress(path)) == 2


# Until the host's trainer attaches the callback itself, this entry attaches it to any Trainer
# (once, whoever attached it first) and runs the module named first.
PROGRESS_ENTRY = """
    import runpy, sys
    import transformers
    from basic_plugin.host.progress import ProgressCallback, progress_callback

    _init = transformers.Trainer.__init__

    def __init__(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        callback = progress_callback()
        if callback and not any(isinstance(c, ProgressCallback) for c in self.callback_handler.callbacks):
            self.add_callback(callback)

    transformers.Trainer.__init__ = __init__
    module = sys.argv.pop(1)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_launcher_reads_progress_while_training(tiny_llava, tiny_data_plain, tmp_path):
    from basic_plugin.lab.tiny import tiny_train_args

    entry = tmp_path / "entry"
    entry.mkdir()
    _write_module(entry, "progress_entry", PROGRESS_ENTRY)
    out = tmp_path / "run"
    seen = []
    run = launch.run("progress_entry", ["tests._vanilla_train",
                                        *tiny_train_args(tiny_llava, *tiny_data_plain, out, max_steps=3)],
                     output_dir=out, env={"PYTHONPATH": f"{entry}{os.pathsep}{REPO_ROOT}", "OMP_NUM_THREADS": "1"},
                     on_progress=seen.append, timeout=300)
    steps = [r["step"] for r in run["progress"] if "loss" in r]
    assert steps == run["steps"] == [1, 2, 3]
    assert [r["loss"] for r in run["progress"] if "loss" in r] == pytest.approx(run["losses"])
    assert all(r["max_steps"] == 3 for r in run["progress"])
    assert seen == run["progress"]  # every record reached the caller, in order
    assert run["progress_path"] == tmp_path / "run.progress.jsonl" and run["log"] == tmp_path / "run.log"
