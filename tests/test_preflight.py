"""The data pre-flight: bad records found before the model loads, the run stopped or trained on the rest;
no-op steps counted, logged and stopped; values that can only waste a run refused while parsing."""
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from basic_plugin.lab.tiny import tiny_train_args, write_tiny_dataset
from tests.helpers import REPO_ROOT, run_training, training_command, training_env

HOST = "basic_plugin.train"


@pytest.fixture
def bad_data(tmp_path):
    """16 pretraining records; four made unusable in four different ways (one only a full decode finds)."""
    json_path, folder = write_tiny_dataset(tmp_path / "data", n=16, template="plain", seed=0)
    records = json.loads(json_path.read_text())
    records[3]["image"] = "missing.png"                       # file absent
    records[5]["image"] = "../" + folder.name + "/../secret.png"  # leaves the image folder
    (folder.parent / "secret.png").write_bytes((folder / records[0]["image"]).read_bytes())
    png = folder / records[7]["image"]
    png.write_bytes(png.read_bytes()[:80])                     # truncated PNG: present, undecodable
    records[9]["conversations"] = records[9]["conversations"][::-1]  # gpt speaks first
    bad_path = tmp_path / "bad.json"
    bad_path.write_text(json.dumps(records))
    return {"json": bad_path, "folder": folder, "records": records,
            "bad_fast": {3: "missing_image_file", 5: "outside_image_folder", 9: "bad_turns"},
            "bad_full": {3: "missing_image_file", 5: "outside_image_folder", 7: "undecodable", 9: "bad_turns"}}


def run_refused(cmd_args, out, env=None):
    """Run the host; return (exit code, output) of a run expected to stop before training."""
    cmd = training_command(HOST, [*cmd_args])
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(env), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


# ---------------------------------------------------------------- pre-flight in training
def test_bad_records_stop_the_run_before_the_model_loads(tiny_llava, bad_data, tmp_path):
    out = tmp_path / "run"
    code, output = run_refused(tiny_train_args(tiny_llava, bad_data["json"], bad_data["folder"], out,
                                               extra=["--basic", "True"]), out)
    assert code == 2, output[-3000:]
    assert "Traceback" not in output and "Loading checkpoint" not in output
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "3 of 16 records are unusable" in error[0] and "--skip_bad_records True" in error[0]
    report = json.loads((out / "preflight" / "report.json").read_text())
    expected = {}
    for kind in bad_data["bad_fast"].values():
        expected[kind] = expected.get(kind, 0) + 1
    assert report["mode"] == "fast" and report["records"] == 16
    assert report["counts"] == expected  # fast mode does not decode: the truncated PNG passes
    for index, kind in bad_data["bad_fast"].items():
        assert any(f"record {index} " in line for line in report["first"][kind])
    assert sorted(p.name for p in out.iterdir()) == ["preflight"]


def test_skip_bad_records_trains_on_exactly_the_good_ones(tiny_llava, bad_data, tmp_path):
    out = tmp_path / "run"
    run = run_training(HOST, tiny_train_args(tiny_llava, bad_data["json"], bad_data["folder"], out, max_steps=2,
                                             extra=["--basic", "True", "--data_preflight", "full",
                                                    "--skip_bad_records", "True"]), output_dir=out)
    kept = json.loads((out / "preflight" / "train_data.json").read_text())
    good = [r for i, r in enumerate(bad_data["records"]) if i not in bad_data["bad_full"]]
    assert kept == good
    report = json.loads((out / "preflight" / "report.json").read_text())
    assert [d["index"] for d in report["dropped"]] == sorted(bad_data["bad_full"])
    assert report["counts"]["undecodable"] == 1
    assert "training on 12 of 16 records (4 dropped" in run["output"]
    # 12 records at batch 2: one step is 1/6 of the epoch LLaVA's loader sees
    assert run["log_history"][0]["epoch"] == pytest.approx(1 / 6, abs=0.01)


def test_vanilla_runs_have_no_preflight_unless_asked(tiny_llava, bad_data, tmp_path):
    out = tmp_path / "run"
    code, output = run_refused(tiny_train_args(tiny_llava, bad_data["json"], bad_data["folder"], out,
                                               extra=["--data_preflight", "fast"]), out)
    assert code == 2 and "3 of 16 records are unusable" in output
    from basic_plugin.host.preflight import resolve_mode

    assert resolve_mode("auto", plugin_active=False) == "off" and resolve_mode("auto", plugin_active=True) == "fast"


def test_fully_truncated_data_is_refused_with_the_length_that_fixes_it(tiny_llava, tiny_data_plain, tmp_path):
    code, output = run_refused(tiny_train_args(tiny_llava, *tiny_data_plain, tmp_path / "a", model_max_length=16,
                                               extra=["--basic", "True"]), tmp_path / "a")
    assert code == 2 and "loses all of its supervised tokens" in output, output[-3000:]
    fix = int(output.split("allowed: --model_max_length >= ")[1].split()[0])
    # the suggested length really trains (finite LM loss); one less is still refused
    code, output = run_refused(tiny_train_args(tiny_llava, *tiny_data_plain, tmp_path / "b",
                                               model_max_length=fix - 1, extra=["--basic", "True"]), tmp_path / "b")
    assert code == 2 and "loses all of its supervised tokens" in output
    run = run_training(HOST, tiny_train_args(tiny_llava, *tiny_data_plain, tmp_path / "c", model_max_length=fix,
                                             max_steps=1, extra=["--basic", "True"]), output_dir=tmp_path / "c")
    assert all(math.isfinite(e["lm_loss"]) for e in run["log_history"] if "lm_loss" in e)


def test_nonfinite_lm_loss_steps_are_logged_and_stop_with_a_restartable_folder(tiny_llava, tiny_data_plain,
                                                                                tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_llava, *tiny_data_plain, out, model_max_length=16, max_steps=5,
                           extra=["--basic", "True", "--data_preflight", "off", "--plugin_max_nonfinite_steps", "2"])
    code, output = run_refused(args, out)
    assert code == 3, output[-3000:]
    assert "'lm_loss_nonfinite_steps': 2" in output and "'loss': nan" in output and "'loss': 0.0" not in output
    assert "stopped the run at step 2" in output and "non-finite language-model loss" in output
    assert (out / "stopped-at-step-2" / "mm_projector.bin").is_file()
    assert not list(out.glob("checkpoint-*"))
    # the documented restart, the same command in the same folder (with a length that fits), is accepted
    fixed = [*args]
    fixed[fixed.index("--model_max_length") + 1] = "64"
    run = run_training(HOST, fixed, output_dir=out)
    assert run["steps"][-1] == 5 and "lm_loss_nonfinite_steps" not in run["log_history"][-2]


# ---------------------------------------------------------------- the pre-flight itself
def test_preflight_finds_each_problem_and_full_mode_decodes(tiny_llava, bad_data, tmp_path):
    from types import SimpleNamespace

    from basic_plugin.host.preflight import preflight

    model_args = SimpleNamespace(model_name_or_path=str(tiny_llava["lm"]), vision_tower=str(tiny_llava["vision"]),
                                 version="plain", mm_use_im_start_end=False, mm_vision_select_feature="patch")
    data_args = SimpleNamespace(data_path=str(bad_data["json"]), image_folder=str(bad_data["folder"]),
                                is_multimodal=False)
    training_args = SimpleNamespace(model_max_length=512, output_dir=str(tmp_path / "o"), dataloader_num_workers=0)
    fast = preflight(model_args, data_args, training_args, "fast", progress=False)
    full = preflight(model_args, data_args, training_args, "full", progress=False)
    assert fast.bad == set(bad_data["bad_fast"]) and full.bad == set(bad_data["bad_full"])
    assert full.tokens["checked"] == 12 and full.tokens["image_tokens"] == 16


@pytest.mark.parametrize("image,problem", [
    ("sub/../ok.png", None),                 # stays inside: fine
    ("sub/../../ok.png", "outside_image_folder"),
    ("/etc/hostname", "outside_image_folder"),
    ("nope.png", "missing_image_file"),
])
def test_image_paths_are_checked_lexically(tmp_path, image, problem):
    from basic_plugin.host.records import normalised_folder, record_problem

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "ok.png").write_bytes(b"x")
    (tmp_path / "ok.png").write_bytes(b"x")
    record = {"id": 1, "image": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                                         {"from": "gpt", "value": "a"}]}
    found = record_problem(record, normalised_folder(folder))
    assert (found and found[0]) == problem


def test_preflight_of_two_ranks_agrees_and_trains(tiny_llava, bad_data, tmp_path):
    out = tmp_path / "run"
    run = run_training(HOST, tiny_train_args(tiny_llava, bad_data["json"], bad_data["folder"], out, max_steps=1,
                                             deepspeed_config="zero2",
                                             extra=["--basic", "True", "--skip_bad_records", "True"]),
                       output_dir=out, deepspeed_ranks=2)
    assert run["steps"] == [1]
    assert run["output"].count("[basic-llava] data pre-flight") == 1  # rank 0 checked, rank 1 was told
    assert len(json.loads((out / "preflight" / "train_data.json").read_text())) == 13


def test_preflight_command_checks_a_dataset_without_loading_a_model(tiny_llava, bad_data, tiny_data_plain, tmp_path):
    import sys

    def command(data, folder, out):
        args = [a for a in tiny_train_args(tiny_llava, data, folder, out) if a]
        return subprocess.run([sys.executable, "-m", "basic_plugin.cli", "preflight", *args], cwd=REPO_ROOT,
                              env=training_env(), capture_output=True, text=True, timeout=300)

    bad = command(bad_data["json"], bad_data["folder"], tmp_path / "a")
    assert bad.returncode == 2 and "4 of 16 records are unusable" in bad.stderr  # full by default: decodes too
    good = command(*tiny_data_plain, tmp_path / "b")
    assert good.returncode == 0 and "pre-flight passed" in good.stdout, good.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["preflight"]


# ---------------------------------------------------------------- records whose supervised tokens all vanish
def _preflight_args(tiny_llava, data_json, folder, tmp_path, *, version="v1", model_max_length=512):
    from types import SimpleNamespace

    model_args = SimpleNamespace(model_name_or_path=str(tiny_llava["lm"]), vision_tower=str(tiny_llava["vision"]),
                                 version=version, mm_use_im_start_end=False, mm_vision_select_feature="patch")
    data_args = SimpleNamespace(data_path=str(data_json), image_folder=str(folder), is_multimodal=False)
    training_args = SimpleNamespace(model_max_length=model_max_length, output_dir=str(tmp_path / "o"),
                                    dataloader_num_workers=0)
    return model_args, data_args, training_args


@pytest.fixture
def mismatched_data(tiny_data_v1, tmp_path):
    """The v1 records, one of whose answers holds the template's separator ``</s>``: LLaVA's preprocess_v1 then
    counts its rounds wrong, prints ``WARNING: tokenization mismatch`` and masks every label of that record."""
    json_path, folder = tiny_data_v1
    records = json.loads(Path(json_path).read_text())
    index = next(i for i, r in enumerate(records) if "image" in r and i > 0)
    records[index]["conversations"][1]["value"] += " </s> and more"
    path = tmp_path / "mismatch.json"
    path.write_text(json.dumps(records))
    return {"json": path, "folder": folder, "index": index, "records": records}


def test_a_record_with_a_tokenization_mismatch_is_unusable_with_its_cause(tiny_llava, mismatched_data, tmp_path):
    from basic_plugin.host.preflight import preflight

    report = preflight(*_preflight_args(tiny_llava, mismatched_data["json"], mismatched_data["folder"], tmp_path),
                       "fast", progress=False)
    assert report.bad == {mismatched_data["index"]} and report.counts == {"no_supervised_tokens": 1}
    (detail,) = report.first["no_supervised_tokens"]
    assert detail.startswith(f"record {mismatched_data['index']} ")
    assert "tokenization mismatch" in detail and "--version v1" in detail and "'</s>'" in detail


def test_a_template_that_mismatches_every_record_is_refused_with_the_version_to_use(tiny_llava, tiny_data_v1,
                                                                                     tmp_path):
    from basic_plugin.host.preflight import PreflightFailed, preflight

    with pytest.raises(PreflightFailed) as refused:  # LLaVA's mpt template on a Llama tokenizer
        preflight(*_preflight_args(tiny_llava, *tiny_data_v1, tmp_path, version="mpt"), "fast", progress=False)
    message = str(refused.value)
    assert message.startswith("--version mpt: LLaVA's preprocess finds a tokenization mismatch in every checked "
                              "record (16)") and "allowed: the template the LLM was trained with (v1" in message
    assert refused.value.report.counts == {"no_supervised_tokens": 16}


def test_a_text_record_whose_turns_are_cut_before_the_answer_is_found(tiny_llava, tiny_data_v1, tmp_path):
    """LLaVA's preprocess cuts a text-only record at --model_max_length before it masks the turns: a long
    question leaves no answer token. The pre-flight counts it with the length that keeps it."""
    from basic_plugin.host.preflight import preflight

    json_path, folder = tiny_data_v1
    records = json.loads(Path(json_path).read_text())
    index = next(i for i, r in enumerate(records) if "image" not in r)
    records[index]["conversations"][0]["value"] = "please " * 300 + records[index]["conversations"][0]["value"]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    report = preflight(*_preflight_args(tiny_llava, path, folder, tmp_path, model_max_length=128), "fast",
                       progress=False)
    assert report.counts == {"fully_truncated": 1} and not report.bad  # a no-op record, counted, not dropped
    (detail,) = report.first["fully_truncated"]
    assert detail.startswith(f"record {index} ") and ">= --model_max_length 128" in detail
    keeps = int(detail.split("(--model_max_length >= ")[1].split()[0])
    assert keeps > 300  # the 300 words come before the answer
    again = preflight(*_preflight_args(tiny_llava, path, folder, tmp_path, model_max_length=keeps), "fast",
                      progress=False)
    assert again.counts == {}


def test_a_mismatched_record_stops_the_run_before_the_model_loads(tiny_llava, mismatched_data, tmp_path):
    out = tmp_path / "run"
    code, output = run_refused(tiny_train_args(tiny_llava, mismatched_data["json"], mismatched_data["folder"], out,
                                               stage="finetune", extra=["--basic", "True"]), out)
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(error) == 1, output[-3000:]
    assert "1 of 16 records are unusable (no_supervised_tokens 1; first: record " in error[0]
    assert "tokenization mismatch" in error[0] and "--skip_bad_records True" in error[0]
    assert sorted(p.name for p in out.iterdir()) == ["preflight"]
