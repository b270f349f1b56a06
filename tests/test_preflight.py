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


def test_a_run_whose_every_step_had_a_nonfinite_lm_loss_exits_non_zero(tiny_llava, tiny_data_plain, tmp_path):
    """Fewer steps than --plugin_max_nonfinite_steps, all NaN: it used to log train_loss 0.0 and exit 0."""
    out = tmp_path / "run"
    code, output = run_refused(tiny_train_args(tiny_llava, *tiny_data_plain, out, model_max_length=16, max_steps=2,
                                               extra=["--basic", "True", "--data_preflight", "off"]), out)
    assert code == 3, output[-3000:]
    assert "every one of the 2 training steps had a non-finite language-model loss" in output
    assert "'train_loss': nan" in output and "'train_loss': 0.0" not in output
    assert not (out / "mm_projector.bin").exists()


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
    assert run["output"].count("[basic-llava] data pre-flight") == 1  # one summary, printed by rank 0
    assert len(json.loads((out / "preflight" / "train_data.json").read_text())) == 13
    report = json.loads((out / "preflight" / "report.json").read_text())
    assert [r["records"] for r in report["ranks"]] == [8, 8]  # under DeepSpeed too, the ranks shared the check


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


# ---------------------------------------------------------------- parity with LLaVA's own dataset
def _turns(*pairs):
    return [{"from": who, "value": text} for who, text in pairs]


H, G = "human", "gpt"
#: (template, record shape) - LLaVA's own record shapes (LCS-558K, mix665k's image and ShareGPT
#: text-only records, multi-turn) and the ways a record can go wrong
PARITY = {
    "plain caption (LCS-558K)": ("plain", {"id": "0", "image": "a.png", "conversations": _turns((H, "<image>\nRender a caption."), (G, "a cat"))}),
    "plain without id": ("plain", {"image": "a.png", "conversations": _turns((H, "Describe.\n<image>"), (G, "a cat"))}),
    "plain roles swapped, tag first": ("plain", {"image": "a.png", "conversations": _turns((G, "<image>"), (H, "a cat"))}),
    "plain reversed (caption first)": ("plain", {"image": "a.png", "conversations": _turns((G, "a cat"), (H, "<image>\nq"))}),
    "plain three turns": ("plain", {"image": "a.png", "conversations": _turns((H, "<image>"), (G, "a"), (H, "b"))}),
    "plain text-only": ("plain", {"conversations": _turns((H, "hello"), (G, "a cat"))}),
    "plain tag in the caption": ("plain", {"image": "a.png", "conversations": _turns((H, "<image>"), (G, "a <image> cat"))}),
    "v1 one image, multi-turn (mix665k)": ("v1", {"id": "000000033471", "image": "a.png", "conversations": _turns(
        (H, "<image>\nWhat are the colors of the bus?"), (G, "White and red."), (H, "What feature can be seen?"),
        (G, "A bicycle rack."))}),
    "v1 tag after the question": ("v1", {"image": "a.png", "conversations": _turns((H, "What is it?\n<image>"), (G, "A cat."))}),
    "v1 text-only ShareGPT": ("v1", {"id": "i6IyJda_0", "model": "", "conversations": _turns(
        (H, "How to make a cake?"), (G, "Mix flour and eggs."), (H, "And then?"), (G, "Bake it."))}),
    "v1 without id": ("v1", {"image": "a.png", "conversations": _turns((H, "<image>\nq"), (G, "a"))}),
    "v1 ShareGPT starting with gpt": ("v1", {"conversations": _turns((G, "Hi!"), (H, "How are you?"), (G, "Fine."))}),
    "v1 leading gpt turn, tag after it": ("v1", {"image": "a.png", "conversations": _turns((G, "Hi"), (H, "<image>\nq"), (G, "a"))}),
    "v1 leading gpt turn holds the tag": ("v1", {"image": "a.png", "conversations": _turns((G, "<image>\nHi"), (H, "q"), (G, "a"))}),
    "v1 two tags in one turn": ("v1", {"image": "a.png", "conversations": _turns((H, "<image>\n<image>\nq"), (G, "a"))}),
    "v1 tags in two turns": ("v1", {"image": "a.png", "conversations": _turns((H, "<image>\nq"), (G, "a"), (H, "<image>\nq"), (G, "b"))}),
    "v1 image without a tag": ("v1", {"image": "a.png", "conversations": _turns((H, "q"), (G, "a"))}),
    "v1 tag without an image": ("v1", {"conversations": _turns((H, "<image>\nq"), (G, "a"))}),
    "v1 unknown role": ("v1", {"conversations": _turns((H, "q"), ("system", "x"), (G, "a"))}),
    "v1 two human turns in a row": ("v1", {"conversations": _turns((H, "q"), (H, "q2"), (G, "a"))}),
    "v1 no conversations": ("v1", {"id": "x", "image": "a.png"}),
    "v1 empty conversations": ("v1", {"conversations": []}),
    "v1 value not a string": ("v1", {"conversations": [{"from": H, "value": None}, {"from": G, "value": "a"}]}),
    "v1 two images": ("v1", {"image": ["a.png", "a.png"], "conversations": _turns((H, "<image>\n<image>\nq"), (G, "a"))}),
    "v1 lone surrogate": ("v1", {"conversations": _turns((H, "q \ud83d"), (G, "a"))}),
}


def llava_verdict(tiny_llava, folder, template, record, tmp_path):
    """What LLaVA's own LazySupervisedDataset does with the record: None when it trains on it as the record says,
    else why not (it crashes, or the image is not the record's one image, or the tag is read as text)."""
    from types import SimpleNamespace

    import llava.conversation as conversation_lib
    import transformers
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.train.train import LazySupervisedDataset

    path = tmp_path / "one.json"
    path.write_text(json.dumps([record]))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llava["lm"], model_max_length=512,
                                                           padding_side="right", use_fast=False)
    tokenizer.pad_token = tokenizer.unk_token
    data_args = SimpleNamespace(image_folder=str(folder), image_aspect_ratio="pad", is_multimodal=True,
                                mm_use_im_start_end=False,
                                image_processor=transformers.CLIPImageProcessor.from_pretrained(tiny_llava["vision"]))
    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = conversation_lib.conv_templates[template]
    try:
        dataset = LazySupervisedDataset(str(path), tokenizer, data_args)
        dataset.modality_lengths, dataset.lengths  # what --group_by_modality_length reads
        ids = dataset[0]["input_ids"]
    except Exception as error:  # noqa: BLE001 - a crash is the finding
        return f"crash: {type(error).__name__}"
    finally:
        conversation_lib.default_conversation = saved
    images = int((ids == IMAGE_TOKEN_INDEX).sum())
    if "image" in record and images != 1:
        return f"{images} image placeholders for the record's one image"
    if "image" not in record and images:
        return "a blank image spliced in"
    if "<image>" in tokenizer.decode(ids[ids >= 0]):
        return "the tag read as text"
    return None


@pytest.mark.parametrize("name", list(PARITY))
def test_preflight_accepts_what_llava_trains_on_and_refuses_the_rest(tiny_llava, tmp_path, name):
    import random

    from basic_plugin.host.preflight import training_template
    from basic_plugin.host.records import normalised_folder, record_problem, turn_style
    from basic_plugin.lab.tiny import _random_png

    folder = tmp_path / "images"
    folder.mkdir()
    _random_png(folder / "a.png", random.Random(0))
    template, record = PARITY[name]
    if "id" not in name:
        record = {"id": name, **record}  # records carry an id, except where its absence is the point
    llava = llava_verdict(tiny_llava, folder, template, record, tmp_path)
    ours = record_problem(record, normalised_folder(folder), style=turn_style(training_template(template)))
    assert (ours is None) == (llava is None), (name, llava, ours)


# ---------------------------------------------------------------- several ranks
def _rank_preflight(rank, world, port, paths, delay, results):
    """One rank of a gloo group whose collectives time out after 3 s; decoding an image takes ``delay`` s."""
    import datetime
    import time
    from types import SimpleNamespace

    import torch.distributed as dist

    from basic_plugin.host import preflight as pf

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))
    getattr(pf, "ROUND", {})["images"] = 4  # a round of 4 decodes: one all-reduce every 4 * delay s
    real = pf._decode
    pf._decode = lambda path: (time.sleep(delay), real(path))[1]
    model_args = SimpleNamespace(model_name_or_path=paths["lm"], vision_tower=paths["vision"], version="plain",
                                 mm_use_im_start_end=False, mm_vision_select_feature="patch")
    data_args = SimpleNamespace(data_path=paths["data"], image_folder=paths["folder"], is_multimodal=False)
    training_args = SimpleNamespace(model_max_length=512, output_dir=paths["out"], dataloader_num_workers=0,
                                    data_preflight="full", skip_bad_records=True)
    try:
        outcome = pf.run_preflight(model_args, data_args, training_args, plugin_active=True)
        result = {"bad": outcome["bad"], "ranks": outcome["report"].get("ranks")}
    except Exception as error:  # noqa: BLE001 - a timeout is the finding
        result = {"error": f"{type(error).__name__}: {error}"}
    Path(results, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_ranks_share_the_full_preflight_and_never_wait_out_a_timeout(tiny_llava, bad_data, tmp_path):
    """`full` on 2 ranks: each decodes its half of the images, in rounds with an all-reduce after each, so
    a rank never waits for the other longer than one round; here a round (4 decodes x 0.4 s) stays under the
    group's 3 s timeout that one rank checking all 12 images (about 5 s) alone would overrun."""
    import torch.multiprocessing as mp

    from basic_plugin.lab.launch import free_port

    paths = {"lm": str(tiny_llava["lm"]), "vision": str(tiny_llava["vision"]), "data": str(bad_data["json"]),
             "folder": str(bad_data["folder"]), "out": str(tmp_path / "run")}
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_rank_preflight, args=(2, free_port(), paths, 0.4, str(results)), nprocs=2, join=True)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all("error" not in r for r in ranks), ranks
    assert ranks[0]["bad"] == ranks[1]["bad"] == sorted(bad_data["bad_full"])
    shares = ranks[0]["ranks"]
    assert [s["records"] for s in shares] == [8, 8]
    assert all(s["images_decoded"] > 0 for s in shares) and sum(s["images_decoded"] for s in shares) == 13
    kept = json.loads((tmp_path / "run" / "preflight" / "train_data.json").read_text())
    assert len(kept) == 12


# ---------------------------------------------------------------- a corrupt image that `fast` let through
@pytest.fixture
def corrupt_image_data(tmp_path):
    json_path, folder = write_tiny_dataset(tmp_path / "data", n=8, template="plain", seed=0)
    records = json.loads(json_path.read_text())
    png = folder / records[2]["image"]
    png.write_bytes(png.read_bytes()[:80])  # present (fast passes it), undecodable
    return json_path, folder, records[2], png


def test_a_corrupt_image_at_load_time_is_one_line_naming_the_record(tiny_llava, corrupt_image_data, tmp_path):
    json_path, folder, record, png = corrupt_image_data
    out = tmp_path / "run"
    code, output = run_refused(tiny_train_args(tiny_llava, json_path, folder, out, max_steps=4,
                                               extra=["--basic", "True"]), out)
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and f"record 2 (id {record['id']!r}): image {png} does not decode" in error[0]


def test_a_corrupt_image_at_load_time_is_skipped_and_counted(tiny_llava, corrupt_image_data, tmp_path):
    json_path, folder, record, png = corrupt_image_data
    out = tmp_path / "run"
    run = run_training(HOST, tiny_train_args(tiny_llava, json_path, folder, out, max_steps=4,
                                             extra=["--basic", "True", "--skip_bad_records", "True"]), output_dir=out)
    assert run["steps"] == [1, 2, 3, 4]  # one epoch: every record reached
    assert run["output"].count(f"image {png} does not decode") == 1 and "skipped (--skip_bad_records True)" in run["output"]
    assert run["log_history"][-2]["data_skipped_records"] == 1
