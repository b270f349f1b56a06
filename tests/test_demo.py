"""The demo's pieces, each against an independent check, and a smoke run of the whole pipeline (tiny model)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from basic_plugin.lab.demo import data as demo_data
from basic_plugin.lab.demo.evaluate import (candidate_ids, compare_paired, mcnemar_exact, mcnemar_sample_size, paired_bootstrap,
                                        score_naive, score_shared_prefix, wilson_interval)
from basic_plugin.lab.lens import LayerLens, is_meaningful_word, meaningful_token_mask, nearest_tokens, normalized_vocabulary, token_text
from basic_plugin.host.records import RecordError, load_records, validate_record
from tests.helpers import write_idx, write_synthetic_fmnist


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_fmnist(tmp_path_factory):
    """A Fashion-MNIST-shaped folder: 3 train and 2 test images per class, each class a distinct pattern."""
    return write_synthetic_fmnist(tmp_path_factory.mktemp("fmnist"))


# -- captions, records, data --------------------------------------------------------------------
def test_captions_from_class_names():
    assert demo_data.caption(7) == "A photo of a sneaker."
    assert demo_data.caption(9) == "A photo of an ankle boot."
    assert demo_data.caption(1, "{A} {x} on a black background.") == "A pair of trousers on a black background."
    assert demo_data.caption(9, "{A} {x} on a black background.") == "An ankle boot on a black background."
    caps = demo_data.class_captions()
    assert len(caps) == 10 and len(set(caps)) == 10
    assert demo_data.EVAL_TEMPLATE in demo_data.TEMPLATES  # the scored captions are a trained form


def test_records_are_valid_llava_records(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    rec = demo_data.make_record("r1", "a.png", "A photo of a bag.", label=8)
    validate_record(rec, tmp_path)
    assert rec["conversations"][0]["value"].startswith("<image>\n")
    with pytest.raises(RecordError):
        validate_record(demo_data.make_record("r2", "missing.png", "x"), tmp_path)


def test_idx_reader_on_a_synthetic_file(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    write_idx(tmp_path / "y-idx1-ubyte", np.array([3, 1, 4], dtype=np.uint8), gz=False)
    assert np.array_equal(demo_data.read_idx(tmp_path / "x-idx3-ubyte.gz"), arr)
    assert demo_data.read_idx(tmp_path / "y-idx1-ubyte").tolist() == [3, 1, 4]
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="magic"):
        demo_data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="header says"):
        demo_data.read_idx(tmp_path / "short")


@pytest.mark.skipif(not demo_data.fmnist_available(), reason=f"needs `{demo_data.INSTALL_HINT}` (not installed here)")
def test_real_fashion_mnist_files():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = demo_data.load_fmnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.shape == (n,)
        assert np.bincount(labels).tolist() == [n // 10] * 10
        assert 0 < images.mean() < 255


def test_build_dataset(synthetic_fmnist, tmp_path):
    from PIL import Image

    out = tmp_path / "data"
    paths = demo_data.build_dataset(out, train=20, test=10, size=56, seed=0, fmnist_dir=synthetic_fmnist, progress=False)
    folder = Path(paths["image_folder"])
    train = load_records(paths["train"], folder)
    test = load_records(paths["test"], folder)
    assert len(train) == 20 and len(test) == 10
    assert sorted(r["label"] for r in test) == list(range(10))  # balanced: one per class
    for r in test:
        assert r["conversations"][1]["value"] == demo_data.caption(r["label"]) and r["class"] == demo_data.CLASSES[r["label"]]
    # train captions name the true class: the image pattern row encodes it
    images, labels = demo_data.load_fmnist("train", synthetic_fmnist)
    for r in train:
        idx = int(r["id"].rsplit("-", 1)[1])
        assert demo_data.PHRASES[labels[idx]] in r["conversations"][1]["value"]
    with Image.open(folder / test[0]["image"]) as img:
        assert img.mode == "RGB" and img.size == (56, 56)
    photos = json.loads(Path(paths["photos"]).read_text())
    assert any(p["id"] == "photo-grace_hopper" for p in photos)  # matplotlib ships it
    before = Path(paths["train"]).stat().st_mtime_ns
    assert demo_data.build_dataset(out, train=20, test=10, size=56, seed=0, fmnist_dir=synthetic_fmnist,
                                   progress=False) == paths
    assert Path(paths["train"]).stat().st_mtime_ns == before  # second call: nothing rewritten


def test_data_cli_says_how_to_install(tmp_path, capsys):
    assert demo_data.main(["--out", str(tmp_path / "d"), "--fmnist-dir", str(tmp_path / "nothing")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


# -- statistics -----------------------------------------------------------------------------------
def test_wilson_interval_hand_computed():
    # 8/10: centre (0.8 + 1.92^2/20) / (1 + 1.96^2/10) ... the textbook values
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def test_mcnemar_and_paired_comparison_hand_computed():
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    a = [True] * 6 + [False] * 4            # baseline: 6/10
    b = [True] * 4 + [False] * 2 + [True] * 4  # BASIC: 8/10; only-a 2, only-b 4
    c = compare_paired(a, b, iters=2000)
    assert (c["n"], c["only_a"], c["only_b"]) == (10, 2, 4)
    assert c["acc_a"] == 0.6 and c["acc_b"] == 0.8 and c["diff"] == pytest.approx(0.2)
    assert c["mcnemar_p"] == pytest.approx(2 * (1 + 6 + 15) / 64)
    assert c["diff_ci"][0] <= 0.2 <= c["diff_ci"][1]
    # (1.959964 sqrt(.15) + 0.841621 sqrt(.15 - .0004))^2 / .0004 = (0.759091 + 0.325524)^2 / .0004 = 2940.97
    assert mcnemar_sample_size(0.15, 0.02) == 2941
    assert paired_bootstrap([True, False] * 5, [True, False] * 5) == (0.0, 0.0)
    assert paired_bootstrap([False] * 4, [True] * 4) == (1.0, 1.0)


def test_paired_bootstrap_against_a_plain_loop_and_the_normal_approximation():
    """The numpy bootstrap: the same order statistics as a plain Python loop over the same draws, and at
    n = 6,000 an interval within Monte Carlo error of the normal approximation (mean +- 1.96 sd / sqrt(n))."""
    import random
    import statistics

    import numpy as np

    rng = random.Random(5)
    a = [rng.random() < 0.4 for _ in range(50)]
    b = [rng.random() < 0.5 for _ in range(50)]
    picks = np.random.default_rng(7).integers(0, 50, size=(3000, 50)).tolist()
    stats = sorted(statistics.fmean(float(b[i]) - float(a[i]) for i in row) for row in picks)
    assert paired_bootstrap(a, b, iters=3000, seed=7) == pytest.approx((stats[75], stats[2924]), abs=1e-12)
    a = [rng.random() < 0.3 for _ in range(6000)]
    b = [rng.random() < 0.33 for _ in range(6000)]
    d = [float(y) - float(x) for x, y in zip(a, b)]
    half = 1.959964 * statistics.stdev(d) / 6000 ** 0.5
    lo, hi = paired_bootstrap(a, b)
    assert lo == pytest.approx(statistics.fmean(d) - half, abs=0.002)
    assert hi == pytest.approx(statistics.fmean(d) + half, abs=0.002)


# -- meaningful words and the lens ------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    (" shirt", True), (" Dress", True), (" ANKLE", True), (" tion", True),
    ("shirt", False), ("monary", False), ("\u2581boots", False),  # continuation pieces / raw marker
    (" the", False), (" The", False), (" of", False), (" through", False), (" ab", False), (" x", False),
    (" 123", False), ("(){}", False), (" _id", False), ("\ufffd", False), (" caf\u00e9", False), ("   ", False),
    ("", False), (" sneaker.", False), ("  shirt", False),
])
def test_meaningful_word(text, expected):
    assert is_meaningful_word(text) is expected


def test_meaningful_mask_skips_special_tokens(tiny_llava):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llava["lm"], use_fast=False)
    mask = meaningful_token_mask(tok, len(tok) + 3)
    assert mask.shape == (len(tok) + 3,) and not mask[len(tok):].any()
    assert not mask[tok.all_special_ids].any()
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    for i, piece in enumerate(pieces):  # independent of token_text: SentencePiece's "▁" marks a word start
        expected = piece.startswith("\u2581") and i not in tok.all_special_ids and is_meaningful_word(" " + piece[1:])
        assert bool(mask[i]) is expected, piece
    assert mask.sum() > 10


def test_nearest_words_per_layer_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    vocab = torch.randn(40, 8, generator=gen)
    meaningful = torch.zeros(40, dtype=torch.bool)
    meaningful[::3] = True
    hidden = [torch.randn(2, 7, 8, generator=gen) * (1 + k) for k in range(4)]
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 1:5] = True
    mask[1, 2:6] = True
    lens = LayerLens(normalized_vocabulary(vocab), meaningful)
    lens.add(hidden, mask)
    summary = lens.summary()

    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    vocab_l = vocab.tolist()
    expect = []
    for b in range(2):
        counts = []
        for layer in range(4):
            count = 0
            for t in range(7):
                if mask[b, t]:
                    row = hidden[layer][b, t].tolist()
                    best = max(range(40), key=lambda v: cos(row, vocab_l[v]))
                    count += bool(meaningful[best])
            counts.append(count)
        expect.append(counts)
    assert summary["per_image"] == expect
    assert summary["mean_meaningful"] == [pytest.approx((expect[0][k] + expect[1][k]) / 2) for k in range(4)]
    assert summary["tokens_per_image"] == 4
    states = hidden[2].reshape(-1, 8)
    brute = [max(range(40), key=lambda v: cos(states[i].tolist(), vocab_l[v])) for i in range(states.shape[0])]
    assert nearest_tokens(states, normalized_vocabulary(vocab), chunk=5).tolist() == brute


# -- shared-prefix scoring ----------------------------------------------------------------------------
def test_shared_prefix_scoring_equals_naive_scoring(tiny_llava):
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llava["lm"], use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava["lm"]).eval()
    prefix, cand = candidate_ids(tok, demo_data.class_captions())
    assert prefix[-1] == -200 and len({len(c) for c in cand}) > 1  # ragged candidates exercise the padding
    gen = torch.Generator().manual_seed(1)
    embeds = torch.randn(3, 9, model.config.hidden_size, generator=gen) * 0.05
    fast, hidden = score_shared_prefix(model, embeds, cand, output_hidden_states=True)
    slow = score_naive(model, embeds, cand)
    assert fast.shape == (3, 10) and torch.allclose(fast, slow, atol=1e-4, rtol=1e-5)
    # the prefix pass covers the image prefix and the tokens every candidate starts with ("A photo of")
    assert len(hidden) == model.config.num_hidden_layers + 1 and torch.equal(hidden[0][:, :9], embeds)
    assert hidden[0].shape[1] > 9
    # and the naive score is the model's own mean token loss times the length
    full = torch.cat([embeds[:1], model.get_input_embeddings()(torch.tensor([cand[4]]))], dim=1)
    labels = torch.full(full.shape[:2], -100)
    labels[0, 9:] = torch.tensor(cand[4])
    with torch.no_grad():
        loss = model(inputs_embeds=full, labels=labels).loss
    assert slow[0, 4].item() == pytest.approx(-loss.item() * len(cand[4]), rel=1e-4)


def test_validation_split_is_held_out_and_balanced(synthetic_fmnist, tmp_path):
    paths = demo_data.build_dataset(tmp_path / "data", train=10, test=10, val=20, size=56, seed=0,
                                    fmnist_dir=synthetic_fmnist, progress=False)  # 3 train images per class
    folder = Path(paths["image_folder"])
    train, val = load_records(paths["train"], folder), load_records(paths["val"], folder)
    test = load_records(paths["test"], folder)
    assert len(val) == 20 and sorted(r["label"] for r in val) == sorted(list(range(10)) * 2)
    assert not {r["image"] for r in val} & {r["image"] for r in train}  # never trained on
    assert not {r["image"] for r in val} & {r["image"] for r in test}  # and not the test split
    images, labels = demo_data.load_fmnist("train", synthetic_fmnist)
    for r in val:
        assert int(labels[int(r["id"].rsplit("-", 1)[1])]) == r["label"]


def test_caption_prior_is_the_caption_likelihood_without_the_image(tiny_llava):
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    from basic_plugin.lab.demo.evaluate import caption_prior, confusion

    tok = AutoTokenizer.from_pretrained(tiny_llava["lm"], use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava["lm"]).eval()
    prefix, cand = candidate_ids(tok, demo_data.class_captions())
    with torch.no_grad():
        prior = caption_prior(model, tok, prefix, cand)
        for c in (0, 7):  # the model's own loss on "[BOS] caption\n", times the caption length
            ids = torch.tensor([[prefix[0], *cand[c]]])
            labels = ids.clone()
            labels[0, 0] = -100
            loss = model(input_ids=ids, labels=labels).loss
            assert prior[c].item() == pytest.approx(-loss.item() * len(cand[c]), rel=1e-4)
    assert confusion([0, 1, 1, 2], [0, 2, 1, 2], 3) == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    # a template without BOS (SmolLM2's tokenizer adds none): conditioned on the EOS token instead
    from types import SimpleNamespace

    no_bos = SimpleNamespace(bos_token_id=None, eos_token_id=2)
    with torch.no_grad():
        prior = caption_prior(model, no_bos, [-200], cand)
        ids = torch.tensor([[2, *cand[3]]])
        labels = ids.clone()
        labels[0, 0] = -100
        assert prior[3].item() == pytest.approx(-model(input_ids=ids, labels=labels).loss.item() * len(cand[3]),
                                                rel=1e-4)


# -- arms, guard, verdict ------------------------------------------------------------------------------
def test_arms_follow_the_grid_choice_and_never_train_the_paper_defaults_twice(monkeypatch):
    from basic_plugin.lab.demo import run, selected

    monkeypatch.setattr(selected, "NAME", "das_0.1")
    monkeypatch.setattr(selected, "FLAGS", ("--basic_lambda_das", "0.1"))
    arms, note = run.plan_arms("", paper_arm=True)
    assert list(arms) == ["baseline", "basic", "paper"] and note is None
    assert arms["baseline"]["flags"] == list(run.MONITOR_FLAGS)
    assert arms["basic"]["flags"] == ["--basic_lambda_das", "0.1"] and arms["paper"]["flags"] == []
    assert arms["basic"]["label"] == "BASIC chosen" and "chosen on validation: das_0.1" in arms["basic"]["title"]
    arms, note = run.plan_arms("--basic_depth 3", paper_arm=False)  # --basic-flags replace the chosen setting
    assert list(arms) == ["baseline", "basic"] and arms["basic"]["flags"] == ["--basic_depth", "3"]
    assert arms["basic"]["label"] == "BASIC flags" and arms["basic"]["title"] == "BASIC (--basic-flags --basic_depth 3)"
    monkeypatch.setattr(selected, "FLAGS", ())  # the grid chose the paper's defaults: no second identical run
    arms, note = run.plan_arms("", paper_arm=True)
    assert list(arms) == ["baseline", "basic"] and arms["basic"]["flags"] == [] and "skipped" in note
    assert "skipped when the basic arm" in " ".join(run.build_parser().format_help().split())


def test_guard_verdict_reads_the_run_folder(tmp_path):
    from basic_plugin.basic.guard import Guard
    from basic_plugin.lab.demo.report import guard_verdict

    message = Guard(mode="warn", window=1).review({"basic_v_pairwise_cos": 0.97, "basic_share": 0.1}).message
    warned = tmp_path / "warned"
    warned.mkdir()
    (warned / "train.log").write_text(f"[2025] loading\n{{'loss': 1.2, 'step': 24}}\n[basic-llava] step 25: {message}\n"
                                      "[basic-llava] step 25: training goes on\n")
    history = [{"step": 24, "loss": 1.2}, {"step": 25, "loss": 1.1, "plugin_guard_warnings": 1}, {"step": 26, "loss": 1.0},
               {"step": 26, "train_runtime": 9.0}]
    (warned / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    verdict = guard_verdict(warned)
    detail = message.split("BASIC guard, ", 1)[1]
    assert detail.startswith("last 1 logging steps: image tokens collapse (mean pairwise cosine 0.970")
    assert verdict == {"warnings": 1, "first_step": 25, "first_message": detail,
                       "text": f"warned 1 time (first at step 25: {detail})"}
    # a second warning logged but missing from a cut-short log still counts
    history.insert(3, {"step": 30, "loss": 0.9, "plugin_guard_warnings": 1})
    (warned / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert guard_verdict(warned)["text"].startswith("warned 2 times (first at step 25: last 1 logging steps")
    silent = tmp_path / "silent"
    silent.mkdir()
    (silent / "train.log").write_text("[basic-llava] step 2: training goes on\n")
    (silent / "trainer_state.json").write_text(json.dumps({"log_history": history[:1]}))
    assert guard_verdict(silent)["text"] == "silent" and guard_verdict(silent)["warnings"] == 0


def test_verdict_words_follow_the_interval():
    from basic_plugin.lab.demo.report import judge

    assert judge((0.01, 0.05)) == "better" and judge((-0.05, -0.01)) == "worse"
    assert judge((-0.01, 0.05)) == judge((0.0, 0.0)) == "no significant difference"
    assert judge((-0.2, -0.1), lower_is_better=True) == "better" and judge((0.1, 0.2), lower_is_better=True) == "worse"


# -- the whole pipeline -------------------------------------------------------------------------------
def test_demo_pipeline_smoke_on_the_tiny_model(synthetic_fmnist, tmp_path, capsys):
    import re

    from basic_plugin.lab import lens
    from basic_plugin.lab.demo import run, selected

    out = tmp_path / "demo"
    assert run.main(["--tiny", "--out", str(out), "--fmnist-dir", str(synthetic_fmnist), "--quiet", "--paper-arm",
                     "--basic-flags", "--basic_lambda_das 0.5"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"[demo] what the grid found (docs/RESULTS.md): {selected.VERDICT}\n")
    assert "[demo] arm paper: BASIC (the paper's defaults): --basic True\n" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]["0"]) == ["baseline", "basic", "paper"]
    agg = summary["aggregate"]
    assert set(agg["vs_baseline"]) == {"basic", "paper"} and agg["pooled"] == agg["vs_baseline"]["basic"]["pooled"]
    pooled = agg["pooled"]
    assert pooled["n"] == 10 and 0 <= pooled["acc_a"] <= 1 and 0 <= pooled["acc_b"] <= 1
    # the flags reach each arm's training command, and only its own
    commands = {arm: (out / "seed0" / arm / "command.txt").read_text() for arm in ("basic", "paper")}
    assert "--basic_lambda_das 0.5" in commands["basic"] and "--basic_lambda_das" not in commands["paper"]
    assert "--basic True" in commands["paper"] and "deepspeed.launcher.runner" in commands["basic"]
    # every run records the code and the CPU kernels it ran with (they decide its rounding)
    import torch

    result = json.loads((out / "seed0" / "paper" / "demo_result.json").read_text())
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "commit" in result["code"]
    # calibrated accuracy: recomputed here from each arm's saved scores and no-image prior
    evals = {arm: json.loads((Path(summary["runs"]["0"][arm]["dir"]) / "eval.json").read_text())
             for arm in ("baseline", "basic", "paper")}
    for arm, ev in evals.items():
        again = [max(range(10), key=lambda c: row[c] - ev["prior_scores"][c]) == y
                 for row, y in zip(ev["scores"], ev["labels"])]
        assert again == ev["calibrated_correct"]
        if arm != "baseline":
            cal = agg["vs_baseline"][arm]["calibrated"]
            assert cal["acc_b"] == pytest.approx(sum(again) / len(again))
            assert cal["acc_a"] == pytest.approx(sum(evals["baseline"]["calibrated_correct"]) / 10)
    assert agg["calibrated"] == agg["vs_baseline"]["basic"]["calibrated"]

    # report.md opens with the verdict; each BASIC arm's word follows from the two arms' calibrated outcomes
    report = (out / "report.md").read_text()
    sections = re.findall(r"^## (.+)$", report, flags=re.M)
    assert sections[0] == "Verdict" and sections.index("BASIC's guard") > 0
    verdict = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert f"What the validation grid found (docs/RESULTS.md, `basic-llava sweep`): {selected.VERDICT}" in verdict
    words = {}
    for arm, label in (("basic", "BASIC flags"), ("paper", "BASIC paper")):
        a, b = evals["baseline"]["calibrated_correct"], evals[arm]["calibrated_correct"]
        lo, hi = paired_bootstrap(a, b)  # the statistic (checked by hand above) on the saved outcomes
        word = words[arm] = "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"
        head = (f"This run (test split, n=10): {label} {100 * sum(b) / 10:.1f}% vs baseline {100 * sum(a) / 10:.1f}% "
                f"calibrated, {100 * (sum(b) - sum(a)) / 10:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], McNemar p = ")
        sentence = next(line for line in verdict.splitlines() if line.startswith(head))
        assert re.match(re.escape(head) + r"[^:]+: (better|worse|no significant difference) \(raw accuracy",
                        sentence).group(1) == word
        assert sentence.endswith("With 1 seed this is an illustration, not evidence: at this scale the seed moves "
                                 "the result more than the setting does, and the grid's verdict above rests on 4 seeds.")
    done = printed.split("[demo] done in", 1)[1].split("\n")[0]  # the terminal's last line names the same verdict
    assert "BASIC flags vs baseline, zero-shot accuracy calibrated" in done and f"): {words['basic']}; raw" in done
    assert "this run's seeds only: the grid's verdict is the first line" in done

    # the guard: silent in runs whose log entries carry no warning (2 steps are less than its window)
    guard_row = next(line for line in report.splitlines() if line.startswith("guard "))
    cells = guard_row.split()[1:]
    assert len(cells) == 3
    for arm, cell in zip(("baseline", "basic", "paper"), cells):
        history = json.loads((out / "seed0" / arm / "trainer_state.json").read_text())["log_history"]
        assert not any("plugin_guard_warnings" in e for e in history) and cell == "silent"
    assert summary["guard"]["0"]["paper"]["text"] == "silent"

    curves = agg["lens"]
    assert len(curves["basic"]["mean_meaningful"]) == 5 and len(curves["paper"]["mean_meaningful"]) == 5
    for name in ("report.md", "report.html", "losses.png", "lens.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    logs = {arm: json.loads((out / "seed0" / arm / "trainer_state.json").read_text())["log_history"]
            for arm in ("baseline", "basic", "paper")}
    assert [e["step"] for e in logs["basic"] if "basic_das" in e] == [1, 2]
    # step 1: same projector init and batch, so the direction term (as added to the loss) scales with its lambda
    first = {arm: next(e["basic_das"] for e in logs[arm] if "basic_das" in e) for arm in ("basic", "paper")}
    assert first["paper"] > 0 and first["basic"] == pytest.approx(0.5 * first["paper"], rel=1e-4)
    # the baseline monitors: BASIC's terms are 0 (no effect on training) and its health curves are logged
    assert [e["basic_das"] for e in logs["baseline"] if "basic_das" in e] == [0.0, 0.0]
    assert all("basic_v_pairwise_cos" in e for e in logs["baseline"] if "loss" in e) and (out / "health.png").is_file()
    assert len(evals["basic"]["predictions"]) == 10 and evals["basic"]["captions"]

    # the lens command on the trained projector-only checkpoint
    lens_out = tmp_path / "lens"
    assert lens.main(["--model-path", str(out / "seed0" / "basic"), "--model-base", str(out / "tiny_model" / "lm"),
                      "--images", str(out / "data" / "images" / "test"), "--max-images", "3", "--out", str(lens_out),
                      "--quiet"]) == 0
    result = json.loads((lens_out / "lens.json").read_text())
    assert result["images"] == 3 and len(result["mean_meaningful"]) == 5 and (lens_out / "lens.png").is_file()
    assert "[lens]" in capsys.readouterr().out
