"""Long runs that never fail late: early refusals, bad data, mixed ranks, resume, compatibility, security."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import transformers

from basic_plugin.lab.tiny import tiny_train_args, write_tiny_dataset
from tests.helpers import REPO_ROOT, all_finite, run_training, training_command, training_env

HOST = "basic_plugin.train"


# ---------------------------------------------------------------- 1. fail early, write nothing
@pytest.fixture
def host_parser():
    """The parser LLaVA's train() builds, with the host's argument classes (no model is loaded)."""
    import llava.train.train as llava_train

    from basic_plugin.host.integration import apply_plugin_host, remove_plugin_host

    apply_plugin_host()
    yield transformers.HfArgumentParser(
        (llava_train.ModelArguments, llava_train.DataArguments, llava_train.TrainingArguments))
    remove_plugin_host()


def parse(parser, tiny_llava, out, *extra, stage="pretrain"):
    args = tiny_train_args(tiny_llava, "data.json", "images", out, stage=stage, extra=["--basic", "True", *extra])
    return parser.parse_args_into_dataclasses(args)


@pytest.mark.parametrize("extra,message", [
    (["--basic_depth", "0"], "--basic_depth 0 is invalid"),
    (["--basic_depth", "5"], "--basic_depth 5 is out of range; allowed: 1..3"),
    (["--basic_depth", "4"], "--basic_depth 4 is out of range; allowed: 1..3 (depth 4 would take the final-normed"),
    (["--basic_lambda_das", "-0.5"], "--basic_lambda_das -0.5 is invalid"),
    (["--basic_lambda_sds", "-1"], "--basic_lambda_sds -1.0 is invalid"),
    (["--mm_patch_merge_type", "spatial_unpad"], "--mm_patch_merge_type flat"),
    (["--image_aspect_ratio", "anyres"], "--image_aspect_ratio square|pad"),
    (["--mm_use_im_start_end", "True"], "--tune_mm_mlp_adapter True with --mm_use_im_start_end True"),
    (["--plugin_max_nonfinite_steps", "0"], "--plugin_max_nonfinite_steps 0 is invalid"),
    (["--basic_lambda_sds", "nan"], "--basic_lambda_sds nan is invalid; allowed: a finite number"),
    (["--basic_lambda_das", "inf"], "--basic_lambda_das inf is invalid; allowed: a finite number"),
    (["--basic_temperature", "inf"], "--basic_temperature inf is invalid; allowed: a finite number"),
    (["--data_preflight", "sometimes"], "invalid choice"),
    (["--basic_drop_channels", "many"], "--basic_drop_channels 'many' is invalid; allowed: 0 (none), auto, or an integer"),
    (["--basic_drop_channels", "-2"], "--basic_drop_channels '-2' is invalid"),
    (["--basic_drop_channels", "2.5"], "--basic_drop_channels '2.5' is invalid"),
])
def test_invalid_settings_are_refused_while_parsing(host_parser, tiny_llava, tmp_path, extra, message, capsys):
    out = tmp_path / "out"
    with pytest.raises((ValueError, SystemExit)) as error:
        parse(host_parser, tiny_llava, out, *extra)
    assert message in (str(error.value) + capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--basic_lambda_das", "0.1"], ["--basic_depth", "2", "--basic_kl", "reverse"]])
def test_plugin_flags_without_the_plugin_switch_are_refused(host_parser, tiny_llava, tmp_path, extra):
    from basic_plugin.host.refusal import Refusal

    out = tmp_path / "out"
    args = tiny_train_args(tiny_llava, "data.json", "images", out, stage="pretrain", extra=extra)
    with pytest.raises(Refusal) as error:
        host_parser.parse_args_into_dataclasses(args)
    assert str(error.value).startswith(f"--{extra[0][2:]} {extra[1]}") and "allowed: add --basic True" in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("basic_vocab", "logits"), ("basic_patch_weights", "max"),
                                         ("basic_kl", "js")])
def test_unknown_choices_name_the_flag_and_the_choices(host_parser, tiny_llava, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        parse(host_parser, tiny_llava, tmp_path / "out", f"--{flag}", value)
    err = capsys.readouterr().err
    assert f"--{flag}" in err and "invalid choice" in err


@pytest.mark.parametrize("stage,extra,said", [
    ("pretrain", ["--basic_pretrain", "False", "--basic_lambda_das", "0.5"], True),
    ("finetune", ["--basic_finetune", "False", "--basic_lambda_sds", "0.1", "--basic_kl", "reverse"], True),
    ("pretrain", ["--basic_pretrain", "False"], False),  # nothing set that would be ignored
    ("finetune", ["--basic_pretrain", "False", "--basic_lambda_das", "0.5"], False),  # on in this stage
])
def test_a_stage_without_basic_says_its_settings_do_nothing(host_parser, tiny_llava, tiny_data_plain, tmp_path, capsys,
                                                            stage, extra, said):
    args = tiny_train_args(tiny_llava, *tiny_data_plain, tmp_path / "out", stage=stage,
                           extra=["--basic", "True", "--data_preflight", "off", *extra])
    host_parser.parse_args_into_dataclasses(args)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[basic] --basic_")]
    if not said:
        assert lines == []
        return
    flag = extra[0]
    changed = " ".join(extra[2:4]) + (", " + " ".join(extra[4:6]) if len(extra) > 4 else "")
    assert len(lines) == 1 and lines[0].startswith(f"[basic] {flag} False: BASIC is off in ")
    assert f"so {changed} ha" in lines[0] and "no effect in this run" in lines[0]


def test_a_plugin_run_on_data_without_images_says_so(tiny_llava, tmp_path, capsys):
    from types import SimpleNamespace

    from basic_plugin.host.preflight import run_preflight

    data = write_tiny_dataset(tmp_path / "data", n=4, template="v1", text_only=4, seed=0)
    model_args = SimpleNamespace(model_name_or_path=str(tiny_llava["lm"]), vision_tower=str(tiny_llava["vision"]),
                                 version="v1", mm_use_im_start_end=False, mm_vision_select_feature="patch")
    data_args = SimpleNamespace(data_path=str(data[0]), image_folder=str(data[1]), is_multimodal=False)
    training_args = SimpleNamespace(model_max_length=512, output_dir=str(tmp_path / "out"), dataloader_num_workers=0,
                                    data_preflight="auto", skip_bad_records=False)
    run_preflight(model_args, data_args, training_args, plugin_active=True)
    assert f"no record of --data_path {data[0]} has an image" in capsys.readouterr().err
    run_preflight(model_args, data_args, training_args, plugin_active=False)  # a vanilla run: not its concern
    assert "has an image" not in capsys.readouterr().err


def test_unsupported_model_type_is_refused_before_loading(host_parser, tiny_llava, tmp_path):
    lm = tmp_path / "gpt2-like"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    paths = dict(tiny_llava, lm=lm)
    with pytest.raises(ValueError, match="'gpt2' checkpoint"):
        parse(host_parser, paths, tmp_path / "out")


def test_pretraining_into_a_folder_with_checkpoints_is_refused(host_parser, tiny_llava, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-100").mkdir(parents=True)
    with pytest.raises(ValueError, match="projector pretraining checkpoints hold only mm_projector.bin"):
        parse(host_parser, tiny_llava, out)


@pytest.mark.parametrize("package,found,message", [
    ("transformers", "4.46.0", "transformers 4.37.x"), ("peft", "0.14.0", "peft >= 0.14 breaks"),
    ("accelerate", "0.28.0", "accelerate 0.29-0.34"), ("llava-torch", None, "llava (missing)")])
def test_unsupported_versions_stop_the_run(monkeypatch, package, found, message):
    from basic_plugin.host import versions

    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda dist: found if dist in (package, "llava") else real(dist))
    from basic_plugin.host.refusal import Refusal

    with pytest.raises(Refusal) as error:
        versions.require_supported_versions()
    assert message in str(error.value) and "unsupported; allowed:" in str(error.value)


def test_a_configuration_error_is_one_line_and_exit_2(tiny_llava, tiny_data_plain, tmp_path):
    """e.g. --basic_depth 999: `error: ...`, status 2, no traceback, nothing written; the env var shows it."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *tiny_data_plain, out, extra=["--basic", "True", "--basic_depth", "999"])
    cmd = training_command(HOST, args)
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith("error: --basic_depth 999 is out of range; allowed: 1..3")
    assert not out.exists()
    debug = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env({"BASIC_LLAVA_TRACEBACK": "1"}),
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


REFUSED_COMMANDS = {
    "invalid choice": (["--basic", "True", "--basic_vocab", "logits"], "argument --basic_vocab: invalid choice"),
    "unknown flag": (["--basic", "True", "--no_such_flag", "1"], "unknown training flags: ['--no_such_flag', '1']"),
    "data_path a folder": (["--basic", "True"], "is a folder; allowed: a readable JSON file"),
    "data_path unreadable": (["--basic", "True"], "cannot be read (OSError"),
    "output_dir unwritable": (["--basic", "True"], "is a file, not a folder"),
    "BASIC flag at its default without --basic": (["--basic_lambda_das", "1.0"],
                                                   "--basic_lambda_das 1.0: set while --basic is off"),
    "BASIC bool flag at its default without --basic": (["--basic_pretrain", "True"],
                                                        "--basic_pretrain True: set while --basic is off"),
    "data file not UTF-8": (["--basic", "True"], "not valid JSON ('utf-8' codec can't decode byte 0xc0"),
    "a record with a lone surrogate": (["--basic", "True"], "1 of 16 records are unusable (bad_text 1;"),
}


@pytest.mark.parametrize("case", list(REFUSED_COMMANDS))
def test_refusals_are_one_line_before_anything_is_written(tiny_llava, tiny_data_plain, tmp_path, case):
    """Each: `error: ...` alone (no usage, no traceback), status 2, before any file is written."""
    extra, message = REFUSED_COMMANDS[case]
    data, folder = tiny_data_plain
    out = tmp_path / "run"
    if case == "data_path a folder":
        data = folder
    elif case == "data_path unreadable":
        if not Path("/proc/self/mem").exists():
            pytest.skip("needs /proc/self/mem (a file that opens but cannot be read, for root too)")
        data = "/proc/self/mem"
    elif case == "output_dir unwritable":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "run"
    elif case == "data file not UTF-8":
        data = tmp_path / "latin1.json"
        data.write_bytes(Path(tiny_data_plain[0]).read_text().replace("A ", "\u00c0 ").encode("latin-1"))
    elif case == "a record with a lone surrogate":
        records = json.loads(Path(tiny_data_plain[0]).read_text())
        records[4]["conversations"][1]["value"] += "\ud83d"  # as json.load reads the escape "\\ud83d"
        data = tmp_path / "surrogate.json"
        data.write_text(json.dumps(records))
    res = subprocess.run(training_command(HOST, tiny_train_args(tiny_llava, data, folder, out, extra=extra)),
                         cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and message in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "usage:" not in res.stderr
    if case == "a record with a lone surrogate":  # found by the pre-flight: its report is the one file
        assert [p.name for p in out.rglob("*")] == ["preflight", "report.json"]
    else:
        assert not out.exists()


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from basic_plugin.host.preflight import write_json

    target = tmp_path / "preflight" / "train_data.json"
    with pytest.raises(TypeError):
        write_json(str(target), [{"conversations": {1, 2}}])  # a set: not JSON
    assert list(target.parent.iterdir()) == []
    write_json(str(target), [{"id": "a\ud83d", "conversations": []}])  # a lone surrogate, as json.load gives it
    assert json.loads(target.read_text(encoding="utf-8")) == [{"id": "a\ud83d", "conversations": []}]


# ---------------------------------------------------------------- 2. bad data never crashes
def test_truncation_through_the_image_block_keeps_training(tiny_llava, tmp_path):
    from tests.test_basic_objective import BATCH, last_step, make_batch, make_model, ready

    model = ready(make_model(tiny_llava, max_length=12))  # cuts the image blocks (16 rows each)
    out = model(**make_batch(BATCH))
    out.loss.backward()
    assert torch.isfinite(out.loss) and last_step(model).skipped is None
    assert all(torch.isfinite(v) for v in last_step(model).terms.values())


def test_image_rows_that_do_not_check_out_skip_the_terms_not_the_step(tiny_llava, monkeypatch):
    from basic_plugin.host import forward
    from tests.test_basic_objective import BATCH, last_step, make_batch, make_model, ready

    real = forward.image_token_positions

    def off_by_one(*args, **kwargs):  # as if LLaVA spliced differently than re-derived
        pos = real(*args, **kwargs)
        pos.seq_index = pos.seq_index + 1
        return pos

    monkeypatch.setattr(forward, "image_token_positions", off_by_one)
    model = ready(make_model(tiny_llava))
    out = model(**make_batch(BATCH))
    assert last_step(model).skipped == "image_rows"
    assert last_step(model).terms["basic_das"].item() == 0.0
    assert out.loss.item() == pytest.approx(last_step(model).terms["lm_loss"].item())


def test_nonfinite_terms_leave_the_lm_loss_alone(tiny_llava, monkeypatch):
    from basic_plugin.basic import objective as basic
    from tests.test_basic_objective import BATCH, last_step, make_batch, make_model, ready

    real = basic.basic_terms

    def poisoned(*args, **kwargs):
        losses, metrics = real(*args, **kwargs)
        return {**losses, "basic_sds": losses["basic_sds"] * float("nan")}, metrics

    monkeypatch.setattr(basic, "basic_terms", poisoned)
    model = ready(make_model(tiny_llava))
    out = model(**make_batch(BATCH))
    assert last_step(model).skipped == "nonfinite" and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(last_step(model).terms["lm_loss"].item())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tiny_llava, tiny_data_v1, tmp_path, toy_plugin_env):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=6,
                           extra=["--toy_weight", "1e39", "--plugin_max_nonfinite_steps", "2"])  # inf in float32
    with pytest.raises(AssertionError) as failure:
        run_training(HOST, args, output_dir=out, env=toy_plugin_env)
    text = str(failure.value)
    assert "stopped the run at step 2" in text and "2 consecutive steps" in text
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert all(e.get("plugin_skipped_steps") in (1, 2) for e in state["log_history"] if "loss" in e)
    assert all_finite(e["loss"] for e in state["log_history"] if "loss" in e)


# ---------------------------------------------------------------- 3. mixed ranks never hang
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_one_rank_with_images_one_without_never_hangs(tiny_llava, tmp_path, zero):
    # 4 records, 1 with an image; 2 ranks x batch 1 x 2 steps use each record once, so at one
    # step one rank has the image and the other has none.
    data = write_tiny_dataset(tmp_path / "data", n=4, template="v1", text_only=3, seed=3)
    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *data, out, stage="finetune", max_steps=2, batch=1, deepspeed_config=zero,
                           extra=["--basic", "True", "--group_by_modality_length", "False"])
    run = run_training(HOST, args, output_dir=out, deepspeed_ranks=2, timeout=240)  # the watchdog
    assert all_finite(run["losses"]) and len(run["losses"]) == 2
    assert sum(e.get("basic_image_samples", 0) for e in run["log_history"] if "loss" in e) > 0  # absent: no image


# ---------------------------------------------------------------- 4. resume
def test_killed_finetune_resumes_on_the_same_trajectory(tiny_llava, tiny_data_v1, tmp_path):
    def args(out):
        return tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=8, batch=2,
                               extra=["--basic", "True", "--save_strategy", "steps", "--save_steps", "3",
                                      "--basic_lambda_sds", "0.5", "--seed_model_init", "True"])

    whole = run_training(HOST, args(tmp_path / "whole"), output_dir=tmp_path / "whole")
    out = tmp_path / "killed"
    cmd = training_command(HOST, args(out))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=training_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-3" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint-3 before the run ended"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "trainer_state.json").exists()  # it really did not finish
    resumed = run_training(HOST, args(out), output_dir=out)  # LLaVA resumes from checkpoint-* by itself
    start = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if p.name != "checkpoint-8")
    after = {e["step"]: e for e in resumed["log_history"] if "loss" in e and e["step"] > start}
    reference = {e["step"]: e for e in whole["log_history"] if "loss" in e and e["step"] > start}
    assert after.keys() == reference.keys() and len(after) >= 2
    before = [e["loss"] for e in resumed["log_history"] if "loss" in e and e["step"] <= start]
    assert before == [e["loss"] for e in whole["log_history"] if "loss" in e and e["step"] <= start]
    for step in after:
        for key in ("loss", "lm_loss", "basic_das", "basic_sds"):
            assert (key in after[step]) == (key in reference[step]), (step, key)  # absent: a text-only step
            if key in reference[step]:
                assert after[step][key] == pytest.approx(reference[step][key], rel=1e-3, abs=1e-4), (step, key)


def test_ctrl_c_ends_with_one_line_and_a_resumable_checkpoint(tiny_llava, tiny_data_v1, tmp_path):
    out = tmp_path / "run"
    progress = tmp_path / "progress.jsonl"

    def args(steps):
        return tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=steps, extra=["--basic", "True"])

    proc = subprocess.Popen(training_command(HOST, args(500)), cwd=REPO_ROOT,
                            env=training_env({"BASIC_LLAVA_PROGRESS": str(progress)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (progress.exists() and any('"loss"' in line for line in progress.read_text().splitlines())):
        assert proc.poll() is None and time.monotonic() < deadline, "no training step logged"
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = int(last.split("stopped the run at step ")[1].split(":")[0])
    assert last == (f"basic-llava: stopped the run at step {step}: interrupted (Ctrl-C). Checkpoint saved in "
                    f"{out}/checkpoint-{step} (the same command resumes from it).")
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert took < 60, took  # a tiny step and a checkpoint
    resumed = run_training(HOST, args(step + 2), output_dir=out)
    assert [r["step"] for r in resumed["progress"] if "loss" in r] == [step + 1, step + 2]


def test_resuming_with_other_basic_settings_is_refused_unless_asked(tiny_llava, tiny_data_v1, tmp_path):
    from basic_plugin.basic.arguments import BasicArguments

    out = tmp_path / "run"

    def args(steps, *extra):
        return tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=steps,
                               extra=["--basic", "True", "--save_strategy", "steps", "--save_steps", "2", *extra])

    run_training(HOST, args(2, "--basic_lambda_sds", "0.5"), output_dir=out)
    saved = json.loads((out / "checkpoint-2" / "plugin_settings.json").read_text())  # plain JSON
    # written before the checkpoint itself: a run killed while saving leaves no trainer_state.json without it
    written = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoint-2").iterdir()}
    assert written["plugin_settings.json"] <= min(t for n, t in written.items() if n != "plugin_settings.json")
    expected = {f.name: f.default for f in dataclasses.fields(BasicArguments)}
    expected.update(basic=True, basic_lambda_sds=0.5)
    assert {k: saved[k] for k in expected} == expected
    res = subprocess.run(training_command(HOST, args(4, "--basic_lambda_sds", "0.1", "--basic_kl", "reverse")),
                         cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert "checkpoint-2, trained with --basic_kl forward, --basic_lambda_sds 0.5" in lines[0]
    assert "this run has --basic_kl reverse, --basic_lambda_sds 0.1" in lines[0]
    assert not (out / "checkpoint-4").exists()
    run = run_training(HOST, args(4, "--basic_lambda_sds", "0.1", "--allow_changed_plugin_settings", "True"),
                       output_dir=out)
    assert [r["step"] for r in run["progress"] if "loss" in r] == [3, 4]  # this run resumed after checkpoint-2
    assert json.loads((out / "checkpoint-4" / "plugin_settings.json").read_text())["basic_lambda_sds"] == 0.1


def test_lora_finetune_under_deepspeed_resumes_on_the_same_trajectory(tiny_llava, tiny_data_v1, tmp_path):
    """LLaVA issue #1200: LLaVA's LoRA finetune (ZeRO-2) resumes from ``checkpoint-2`` through the host and continues
    the uninterrupted run's losses; vanilla LLaVA on transformers 4.37 fails at the resume (a strict load of a
    checkpoint that holds the trainable weights only)."""
    import shutil

    def args(out, *basic):
        return tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", lora=True, deepspeed_config="zero2",
                               max_steps=4, extra=["--save_strategy", "steps", "--save_steps", "2", *basic])

    on = ("--basic", "True")
    whole = run_training(HOST, args(tmp_path / "whole", *on), output_dir=tmp_path / "whole", deepspeed_ranks=1)
    assert (tmp_path / "whole" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    for name in ("resumed", "vanilla"):  # a run stopped after checkpoint-2, as a crash would leave it
        shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / name / "checkpoint-2")
    resumed = run_training(HOST, args(tmp_path / "resumed", *on), output_dir=tmp_path / "resumed", deepspeed_ranks=1)
    steps = {e["step"]: e for e in resumed["log_history"] if "loss" in e}
    reference = {e["step"]: e for e in whole["log_history"] if "loss" in e}
    assert sorted(steps) == sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):  # trained after the resume
        for key in ("loss", "lm_loss", "basic_das", "basic_sds"):
            assert steps[step][key] == pytest.approx(reference[step][key], rel=1e-3, abs=1e-4), (step, key)
    assert (tmp_path / "resumed" / "non_lora_trainables.bin").is_file()
    cmd = training_command("tests._vanilla_train", args(tmp_path / "vanilla"), deepspeed_ranks=1)
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(deepspeed_ranks=1), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0 and "Missing key(s) in state_dict" in res.stdout + res.stderr


def test_zero3_adapter_load_into_a_llava_checkpoint_is_refused(tiny_llava, tiny_data_plain, tiny_data_v1, tmp_path):
    """LLaVA issues #1554, #728: ZeRO-3 + --pretrain_mm_mlp_adapter. From the base LLM a BASIC-pretrained projector
    loads and trains; from a LLaVA checkpoint (which builds a projector, partitioned, while it loads) LLaVA's load
    of the adapter fails on a torch.Size([0]) partition: refused before the model loads."""
    import shutil

    pre = tmp_path / "pretrain"
    run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_plain, pre, stage="pretrain", max_steps=1,
                                       extra=["--basic", "True"]), output_dir=pre)
    adapter = pre / "mm_projector.bin"
    base = tmp_path / "from-base"
    run = run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_v1, base, stage="finetune", max_steps=1,
                                             deepspeed_config="zero3", pretrain_mm_mlp_adapter=adapter,
                                             extra=["--basic", "True"]), output_dir=base, deepspeed_ranks=1)
    assert all_finite(run["losses"])
    # a LLaVA checkpoint: the base LLM's files with the vision keys LLaVA writes into a finetuned model's config
    llava = tmp_path / "llava-tiny"
    shutil.copytree(tiny_llava["lm"], llava)
    config = json.loads((llava / "config.json").read_text())
    config.update(json.loads((base / "config.json").read_text()))
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_tower"]
    (llava / "config.json").write_text(json.dumps(config))
    out = tmp_path / "from-llava"
    args = tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=1, deepspeed_config="zero3",
                           pretrain_mm_mlp_adapter=adapter, extra=["--basic", "True", "--model_name_or_path", str(llava)])
    res = subprocess.run(training_command(HOST, args, deepspeed_ranks=1), cwd=REPO_ROOT,
                         env=training_env(deepspeed_ranks=1), capture_output=True, text=True, timeout=600)
    errors = [ln for ln in (res.stdout + res.stderr).splitlines() if "error: --pretrain_mm_mlp_adapter" in ln]
    assert res.returncode != 0 and errors, (res.stdout + res.stderr)[-3000:]
    assert "is a LLaVA checkpoint" in errors[0] and "allowed: drop --pretrain_mm_mlp_adapter" in errors[0]
    assert "size mismatch for" not in res.stdout + res.stderr and "Traceback" not in res.stderr and not out.exists()


def test_lora_with_a_frozen_projector_from_the_base_llm_is_refused(host_parser, tiny_llava, tiny_data_v1, tmp_path):
    """LLaVA issues #784, #1373: the projector of such a LoRA run is saved nowhere; refused while parsing."""
    from basic_plugin.host.refusal import Refusal

    out = tmp_path / "out"

    def parse_finetune(*extra):
        return host_parser.parse_args_into_dataclasses(tiny_train_args(
            tiny_llava, *tiny_data_v1, out, stage="finetune", extra=["--basic", "True", *extra]))

    with pytest.raises(Refusal, match=r"--freeze_mm_mlp_adapter True with --lora_enable True on the base LLM .*"
                                      r"non_lora_trainables\.bin.*allowed: drop --freeze_mm_mlp_adapter"):
        parse_finetune("--lora_enable", "True", "--freeze_mm_mlp_adapter", "True")
    assert not out.exists()
    # LLaVA's finetune_lora.sh (the projector trains): accepted
    parse_finetune("--lora_enable", "True", "--data_preflight", "off")


# ---------------------------------------------------------------- 5. compatibility with vanilla LLaVA
def test_basic_projector_loads_in_vanilla_finetune(tiny_llava, tiny_data_plain, tiny_data_v1, tmp_path):
    pre = tmp_path / "pretrain"
    run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_plain, pre, stage="pretrain", max_steps=2,
                                       extra=["--basic", "True"]), output_dir=pre)
    ft = tmp_path / "vanilla-finetune"
    run = run_training("tests._vanilla_train", tiny_train_args(
        tiny_llava, *tiny_data_v1, ft, stage="finetune", max_steps=1,
        pretrain_mm_mlp_adapter=pre / "mm_projector.bin"), output_dir=ft)
    assert all_finite(run["losses"])
    projector = torch.load(pre / "mm_projector.bin", weights_only=True)
    loaded = torch.load(ft / "pytorch_model.bin", weights_only=True) if (ft / "pytorch_model.bin").exists() else None
    assert projector and all(k.startswith("model.mm_projector.") for k in projector)
    assert loaded is None or set(projector) <= set(loaded)


def test_finished_basic_model_loads_and_generates_with_llava_code(tiny_llava, tiny_data_v1, tmp_path):
    out = tmp_path / "llava-tiny-basic"  # LLaVA's loader keys on 'llava' in the name
    run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_v1, out, stage="finetune", max_steps=1,
                                       extra=["--basic", "True"]), output_dir=out)
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if re.search("basic|plugin", k)]
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(out), None, "llava-tiny-basic", device="cpu",
                                                           device_map=None)
    assert type(model).__module__.startswith("llava.")  # vanilla class, no plugin needed
    image = processor.preprocess(torch.zeros(3, 56, 56).numpy().transpose(1, 2, 0), return_tensors="pt")["pixel_values"]
    ids = tokenizer_image_token("USER: <image>\nWhat is it? ASSISTANT:", tokenizer, return_tensors="pt")[None]
    with torch.no_grad():
        generated = model.generate(ids, images=image.to(model.dtype), max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 1 and 1 <= generated.shape[1] <= 4 + ids.shape[1]


# ---------------------------------------------------------------- 6. security
class _Payload:
    """Unpickling it runs code (writes a marker): what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "marker"

    def write(path):
        torch.save({"weights": _Payload(marker)}, path)
        return path
    return write, marker


def test_checkpoint_loading_never_runs_pickled_code(tiny_llava, tiny_data_plain, tmp_path, hostile):
    """Every place that loads a pickled checkpoint (tower weights, a projector) refuses a hostile one."""
    import pickle
    import shutil
    from types import SimpleNamespace

    from basic_plugin.lab.lens import load_llava
    from basic_plugin.lab.towers.dinov2 import DinoV2VisionTower
    from transformers import CLIPImageProcessor, Dinov2Config, Dinov2Model

    write, marker = hostile
    tower = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(tower, safe_serialization=False)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(tower)
    write(tower / "pytorch_model.bin")
    with pytest.raises((pickle.UnpicklingError, OSError)):  # OSError: transformers' loader wraps it
        DinoV2VisionTower(tower, SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch"))
    # a projector-only checkpoint as LLaVA's pretraining writes it, with a hostile mm_projector.bin
    run = tmp_path / "pretrained"
    run.mkdir()
    shutil.copy(Path(tiny_llava["lm"]) / "config.json", run / "config.json")
    write(run / "mm_projector.bin")
    with pytest.raises(pickle.UnpicklingError):
        load_llava(run, model_base=tiny_llava["lm"])
    assert not marker.exists()
    torch.load(run / "mm_projector.bin", weights_only=False)  # the payload is live: loading it unsafely runs it
    assert marker.read_text() == "code ran"


def test_plugins_load_only_from_entry_points(tmp_path, monkeypatch):
    """A module on the path that is not an installed entry point is never loaded, even when named."""
    import sys

    from basic_plugin.host import plugins

    (tmp_path / "sneaky_plugin.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ALLOW_ENV, "basic,sneaky_plugin")
    plugins.reset_plugins()
    try:
        with pytest.warns(UserWarning, match="sneaky_plugin"):  # an unknown name: warned, not imported
            pm = plugins.load_plugins()
        assert "sneaky_plugin" not in sys.modules and pm.get_plugin("sneaky_plugin") is None
        assert pm.get_plugin("basic") is not None
    finally:
        monkeypatch.delenv(plugins.ALLOW_ENV)
        plugins.reset_plugins()
        plugins.load_plugins()


def test_training_touches_no_network(tiny_llava, tiny_data_plain, tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import ipaddress, socket\n"
        "_connect = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    host = address[0] if isinstance(address, tuple) else None\n"
        "    if host is not None:\n"
        "        try:\n"
        "            ok = ipaddress.ip_address(host).is_loopback\n"
        "        except ValueError:\n"
        "            ok = host == 'localhost'\n"
        "        if not ok:\n"
        "            raise RuntimeError(f'network access to {address} attempted')\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = connect\n"
        "_getaddrinfo = socket.getaddrinfo\n"
        "def getaddrinfo(host, *a, **k):\n"
        "    if host not in (None, 'localhost', '127.0.0.1', '::1') and not str(host).startswith('127.'):\n"
        "        raise RuntimeError(f'name lookup of {host} attempted')\n"
        "    return _getaddrinfo(host, *a, **k)\n"
        "socket.getaddrinfo = getaddrinfo\n")
    out = tmp_path / "run"
    run = run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_plain, out, stage="pretrain", max_steps=1,
                                             deepspeed_config="zero2", extra=["--basic", "True"]),
                       output_dir=out, deepspeed_ranks=1,
                       env={"PYTHONPATH": os.pathsep.join([str(guard), str(REPO_ROOT)])})
    assert all_finite(run["losses"]) and "attempted" not in run["output"]


@pytest.mark.parametrize("record,message", [
    ({"id": 1}, "missing key 'conversations'"),  # LLaVA reads no 'id': a record without one is fine
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"id": 1, "image": "../../etc/passwd", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                              {"from": "gpt", "value": "x"}]}, "outside the image folder"),
    ({"id": 1, "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                         {"from": "gpt", "value": "x"}]}, "does not exist"),
    ({"id": 1, "conversations": [{"from": "gpt", "value": "x"}]}, "should come from 'human'"),
    ({"id": 1, "conversations": [{"from": "human", "value": "<image>\nhi"}]}, "tag without an 'image' key"),
])
def test_records_are_validated_with_clear_errors(tmp_path, record, message):
    from basic_plugin.host.records import RecordError, validate_records

    with pytest.raises(RecordError, match=re.escape(message)):
        validate_records([record], tmp_path)


def test_the_tiny_datasets_pass_validation(tiny_data_plain, tiny_data_v1):
    from basic_plugin.host.records import load_records

    assert len(load_records(*tiny_data_plain)) == 16 and len(load_records(*tiny_data_v1)) == 16
