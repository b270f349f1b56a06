"""LLaVA's real ``train()`` through the plugin host, with and without DeepSpeed, on the tiny model."""
import json

import pytest
import torch

from basic_plugin.lab.tiny import tiny_train_args
from tests.helpers import all_finite, run_training

HOST = "basic_plugin.train"
SEEDED_HOST = "tests._host_train"
VANILLA = "tests._vanilla_train"


def args_for(tiny_llava, data, out, **kw):
    json_path, images = data
    return tiny_train_args(tiny_llava, json_path, images, out, **kw)


def logged(run, key):
    return [e[key] for e in run["log_history"] if "loss" in e and key in e]


def assert_loss_is_sum_of_terms(run, terms):
    """The Trainer's loss is the mean over every batch; the plugin terms are means over the batches that
    had image rows (``plugin_image_fraction`` of them), and add nothing elsewhere."""
    for entry in (e for e in run["log_history"] if "loss" in e):
        total = entry["lm_loss"] + entry.get("plugin_image_fraction", 1.0) * sum(entry.get(t, 0.0) for t in terms)
        assert entry["loss"] == pytest.approx(total, abs=2e-4), entry  # Trainer rounds loss to 4 places


def load_bin(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_without_plugin_flags_training_is_vanilla_llava(tiny_llava, tiny_data_plain, tiny_data_v1, tmp_path, stage):
    data = tiny_data_plain if stage == "pretrain" else tiny_data_v1
    vanilla = run_training(VANILLA, args_for(tiny_llava, data, tmp_path / "vanilla", stage=stage, max_steps=3),
                           output_dir=tmp_path / "vanilla")
    host = run_training(SEEDED_HOST, args_for(tiny_llava, data, tmp_path / "host", stage=stage, max_steps=3),
                        output_dir=tmp_path / "host")
    assert len(vanilla["losses"]) == 3 and vanilla["losses"] == host["losses"]
    # off means off: the same log keys as vanilla LLaVA (no lm_loss, no plugin counters)
    assert [sorted(e) for e in vanilla["log_history"]] == [sorted(e) for e in host["log_history"]]
    if stage == "pretrain":
        a, b = load_bin(tmp_path / "vanilla" / "mm_projector.bin"), load_bin(tmp_path / "host" / "mm_projector.bin")
        assert sorted(a) == sorted(b) and all(k.startswith("model.mm_projector.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert json.loads((tmp_path / "vanilla" / "config.json").read_text()) == \
            json.loads((tmp_path / "host" / "config.json").read_text())


def test_basic_pretrain_zero2_two_ranks(tiny_llava, tiny_data_plain, tmp_path):
    out = tmp_path / "run"
    run = run_training(HOST, args_for(tiny_llava, tiny_data_plain, out, stage="pretrain", max_steps=3,
                                      deepspeed_config="zero2", extra=["--basic", "True"]),
                       output_dir=out, deepspeed_ranks=2)
    assert all_finite(run["losses"]) and len(run["losses"]) == 3
    for key in ("lm_loss", "basic_das", "basic_sds", "basic_cos", "basic_weight_mass"):
        assert len(logged(run, key)) == 3, key
    assert all(v > 0 for v in logged(run, "basic_das"))
    assert_loss_is_sum_of_terms(run, ["basic_das", "basic_sds"])
    weights = load_bin(out / "mm_projector.bin")
    assert weights and all(k.startswith("model.mm_projector.") for k in weights)
    config = json.loads((out / "config.json").read_text())
    assert not [k for k in config if "basic" in k or "plugin" in k]


def test_basic_finetune_zero3_two_ranks_with_text_only_samples(tiny_llava, tiny_data_v1, tmp_path):
    out = tmp_path / "run"
    run = run_training(HOST, args_for(tiny_llava, tiny_data_v1, out, stage="finetune", max_steps=3,
                                      deepspeed_config="zero3", gradient_checkpointing=True,
                                      extra=["--basic", "True", "--basic_lambda_sds", "0.5"]),
                       output_dir=out, deepspeed_ranks=2)
    assert all_finite(run["losses"]) and len(logged(run, "basic_sds")) == 3
    assert all(v > 0 for v in logged(run, "basic_sds"))
    assert_loss_is_sum_of_terms(run, ["basic_das", "basic_sds"])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert not [k for k in config if "basic" in k or "plugin" in k]
    assert any(out.glob("*.safetensors")) or any(out.glob("*.bin"))


@pytest.mark.parametrize("zero,stage,data", [("zero3", "finetune", "tiny_data_v1"), ("zero2", "pretrain", "tiny_data_plain")])
def test_target_variants_two_ranks_train_with_the_same_channels(tiny_llava, zero, stage, data, request, tmp_path):
    """--basic_drop_channels N and --basic_standardize_target under ZeRO-2/3 with 2 ranks through LLaVA's
    train(): the probe runs under ZeRO-3's partitioned weights, and although rank 1 is made to choose its
    channels differently (tests/_rank_channels_train.py), both ranks train with rank 0's."""
    out = tmp_path / "run"
    run = run_training("tests._rank_channels_train",
                       args_for(tiny_llava, request.getfixturevalue(data), out, stage=stage, max_steps=2,
                                deepspeed_config=zero, gradient_checkpointing=zero == "zero3",
                                extra=["--basic", "True", "--basic_drop_channels", "3",
                                       "--basic_standardize_target", "True", "--basic_lambda_sds", "0.5"]),
                       output_dir=out, deepspeed_ranks=2)
    ranks = [json.loads((out / f"channels-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 3 and ranks[0] == ranks[1]
    assert "--basic_drop_channels 3: leaving channels " in run["output"]
    assert all_finite(run["losses"]) and all(v > 0 for v in logged(run, "basic_das"))
    assert_loss_is_sum_of_terms(run, ["basic_das", "basic_sds"])


def test_basic_values_are_means_over_the_image_batches_of_two_ranks(tiny_llava, tmp_path):
    """LLaVA's finetune default --group_by_modality_length True makes whole text-only steps (and, with odd
    counts, one step with an image on one rank only): every logged BASIC value, terms and health, is the mean
    over the (step, rank) batches that had image rows, as recorded on each rank; text-only batches add nothing."""
    from basic_plugin.lab.tiny import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", n=12, template="v1", text_only=5, seed=1)
    out, values = tmp_path / "run", tmp_path / "values"
    values.mkdir()
    run = run_training("tests._rank_values_train",
                       args_for(tiny_llava, data, out, stage="finetune", max_steps=6, batch=1,
                                deepspeed_config="zero2",
                                extra=["--basic", "True", "--logging_steps", "2", "--basic_guard", "off"]),
                       output_dir=out, deepspeed_ranks=2, env={"VALUES_DIR": str(values)})
    ranks = [[json.loads(line) for line in (values / f"values-rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [len(r) for r in ranks] == [6, 6]
    entries = [e for e in run["log_history"] if "loss" in e]
    assert [e["step"] for e in entries] == [2, 4, 6]
    mixed, fractions = 0, []
    for window, entry in enumerate(entries):
        batches = [r[step] for r in ranks for step in (2 * window, 2 * window + 1)]
        with_images = [b for b in batches if b["rows"] > 0]
        mixed += 0 < len(with_images) < len(batches)
        for key in ("basic_das", "basic_sds", "basic_cos", "basic_v_pairwise_cos", "basic_share",
                    "basic_weighted_cos", "basic_image_samples"):
            if not with_images:
                assert key not in entry, (window, key)  # no image anywhere: nothing to report
                continue
            expected = sum(b[key] for b in with_images) / len(with_images)
            assert entry[key] == pytest.approx(expected, rel=1e-4, abs=1e-6), (window, key)
        fractions.append(len(with_images) / len(batches))
    assert mixed >= 1  # some window held text-only batches next to image ones
    assert [e["plugin_image_fraction"] for e in entries] == pytest.approx(fractions)
    assert_loss_is_sum_of_terms(run, ["basic_das", "basic_sds"])


def test_basic_lora_finetune_zero2(tiny_llava, tiny_data_v1, tmp_path):
    out = tmp_path / "run"
    # --mm_projector_lr as in LLaVA's finetune_lora.sh: an empty parameter group that vanilla LLaVA
    # hands to DeepSpeed and the LR scheduler out of step (it fails at step 1 on this stack)
    run = run_training(HOST, args_for(tiny_llava, tiny_data_v1, out, stage="finetune", max_steps=2, lora=True,
                                      deepspeed_config="zero2", mm_projector_lr=2e-5, extra=["--basic", "True"]),
                       output_dir=out, deepspeed_ranks=1)
    assert all_finite(run["losses"]) and len(logged(run, "basic_das")) == 2
    assert (out / "adapter_model.safetensors").exists() or (out / "adapter_model.bin").exists()
    assert (out / "non_lora_trainables.bin").exists()


def test_a_third_party_plugin_trains_through_its_entry_point(tiny_llava, tiny_data_plain, tmp_path, toy_plugin_env):
    out = tmp_path / "run"
    run = run_training(HOST, args_for(tiny_llava, tiny_data_plain, out, stage="pretrain", max_steps=2,
                                      extra=["--toy_weight", "0.25"]),
                       output_dir=out, env=toy_plugin_env)
    toy = logged(run, "toy")  # the objective's loss term: added and logged
    assert len(toy) == 2 and all(v > 0 for v in toy)
    assert_loss_is_sum_of_terms(run, ["toy"])
    assert logged(run, "toy_calls") == [1.0, 2.0]  # the objective's metric: one forward per step so far
    assert "basic_das" not in run["log_history"][0]  # BASIC installed but off


def test_plugin_validation_fails_before_anything_is_written(tiny_llava, tiny_data_plain, tmp_path, toy_plugin_env):
    out = tmp_path / "run"
    with pytest.raises(AssertionError) as failure:  # llava_validate_arguments refuses it
        run_training(HOST, args_for(tiny_llava, tiny_data_plain, out, stage="pretrain", max_steps=1,
                                    extra=["--toy_weight", "-1"]), output_dir=out, env=toy_plugin_env)
    assert "--toy_weight -1.0 is invalid" in str(failure.value)
    assert "Loading checkpoint" not in str(failure.value) and not out.exists()


def test_blocked_plugin_flag_is_refused_clearly(tiny_llava, tiny_data_plain, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AssertionError) as failure:
        run_training(HOST, args_for(tiny_llava, tiny_data_plain, out, stage="pretrain", max_steps=1,
                                    extra=["--basic", "True"]), output_dir=out, env={"LLAVA_PLUGINS_BLOCK": "basic"})
    assert "--basic" in str(failure.value) and "blocked" in str(failure.value)
    assert not out.exists()


def test_off_means_llavas_own_forward(tiny_llava, monkeypatch):
    """Nothing bound: the host's forward hands the call to LLaVA's untouched, no re-splice."""
    from basic_plugin.host import forward
    from tests.test_basic_objective import BATCH, make_batch, make_model, ready

    calls = []
    real = forward.image_token_positions
    monkeypatch.setattr(forward, "image_token_positions", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = ready(make_model(tiny_llava), basic=False)
    model(**make_batch(BATCH))
    assert calls == []
    ready(model)(**make_batch(BATCH))  # the spy itself works: with BASIC on the host path runs
    assert calls == [1]


@pytest.mark.parametrize("flags,vanilla", [([], True), (["--basic", "True"], False)])
def test_saved_training_args_load_without_basic_llava_when_off(tiny_llava, tiny_data_plain, tmp_path, flags, vanilla):
    import subprocess
    import sys

    import llava.train.train as llava_train
    import transformers

    from basic_plugin.host.integration import apply_plugin_host, remove_plugin_host

    apply_plugin_host()
    try:
        parser = transformers.HfArgumentParser(
            (llava_train.ModelArguments, llava_train.DataArguments, llava_train.TrainingArguments))
        args = tiny_train_args(tiny_llava, *tiny_data_plain, tmp_path / "o", extra=["--data_preflight", "off", *flags])
        training_args = parser.parse_args_into_dataclasses(args)[2]
        torch.save(training_args, tmp_path / "training_args.bin")  # as the Trainer saves it: host applied
    finally:
        remove_plugin_host()
    probe = ("import sys, torch; sys.modules['basic_plugin'] = None\n"
             f"a = torch.load({str(tmp_path / 'training_args.bin')!r}, weights_only=False)\n"
             "print(type(a).__name__, a.learning_rate, a.model_max_length, hasattr(a, 'basic'))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if vanilla:
        assert res.returncode == 0, res.stderr[-2000:]
        # a TrainingArguments (transformers' class, LLaVA's fields as attributes), no plugin flag
        assert res.stdout.split() == ["TrainingArguments", str(training_args.learning_rate),
                                      str(training_args.model_max_length), "False"]
    else:  # a BASIC run's arguments keep BASIC's flags, so they need the package
        assert res.returncode != 0 and "basic_plugin" in res.stderr
