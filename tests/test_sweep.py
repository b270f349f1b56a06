"""basic-llava sweep on the tiny model: validation selection, one test pass, resumable."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, training_env, write_synthetic_fmnist


def test_selection_uses_the_calibrated_validation_mean():
    from basic_plugin.lab.sweep import select

    val = {"monitor": {"calibrated_accuracy": 0.30, "accuracy": 0.50},
           "paper": {"calibrated_accuracy": 0.25, "accuracy": 0.60},
           "das_0.1": {"calibrated_accuracy": 0.32, "accuracy": 0.20}}
    assert select(val) == "das_0.1"  # not the raw-accuracy winner
    val["paper"]["calibrated_accuracy"] = 0.32
    assert select(val) == "paper"  # a tie goes to the earlier-listed configuration
    val["monitor"]["calibrated_accuracy"] = 0.90
    assert select(val) == "paper"  # the reference (baseline) arm is not a BASIC setting to choose
    assert select({"monitor": {"calibrated_accuracy": 0.1}}) == "monitor"  # unless it is all there is


def test_health_summary_last_window_and_largest_window():
    from basic_plugin.lab.sweep import health_summary

    shares = [0.1, 0.2, 0.9, 0.9, 0.3, 0.1, 0.1]
    log = [{"step": i + 1, "loss": 1.0, "lm_loss": 2.0 - 0.1 * i, "basic_share": x, "basic_v_pairwise_cos": 0.5}
           for i, x in enumerate(shares)]
    log.append({"step": 7, "train_runtime": 3.0, "basic_share": 99.0})  # the end-of-training entry is not a step
    h = health_summary(log, window=3)
    assert h["basic_share"] == pytest.approx((0.3 + 0.1 + 0.1) / 3)
    assert h["basic_share_max_window"] == pytest.approx((0.9 + 0.9 + 0.3) / 3)  # steps 3-5 (2-4 is 0.667)
    assert h["lm_loss"] == pytest.approx((1.6 + 1.5 + 1.4) / 3)
    assert h["basic_v_pairwise_cos_max_window"] == pytest.approx(0.5) and "basic_weighted_cos" not in h


@pytest.fixture
def fmnist(tmp_path):
    return write_synthetic_fmnist(tmp_path)


def test_tiny_length_then_sweep_selects_on_validation_tests_once_and_resumes(fmnist, tmp_path):
    out = tmp_path / "grid"
    base = [sys.executable, "-m", "basic_plugin.cli"]
    common = ["--tiny", "--quiet", "--seeds", "2", "--fmnist-dir", str(fmnist), "--out", str(out)]
    length = subprocess.run([*base, "length", *common, "--lengths", "1,2", "--threshold", "0"], cwd=REPO_ROOT,
                            env=training_env(), capture_output=True, text=True, timeout=900)
    assert length.returncode == 0, length.stderr[-3000:]
    chosen = json.loads((out / "length.json").read_text())
    # threshold 0: every seed reaches it at the shortest length, whose real runs are then trained and pass
    assert chosen["chosen_steps"] == 1 and chosen["all_seeds_above"] is True
    real = [json.loads((out / "steps1" / "monitor" / f"seed{s}" / "eval_val.json").read_text()) for s in (0, 1)]
    assert chosen["confirmed"][0]["calibrated"] == [e["calibrated_accuracy"] for e in real]
    first_ckpt = json.loads((out / "steps2" / "monitor" / "seed1" / "checkpoint-1" / "eval_val.json").read_text())
    assert chosen["rows"][0]["calibrated"][1] == pytest.approx(first_ckpt["calibrated_accuracy"])
    assert (out / "length.png").is_file() and "Chosen: **1 steps**" in (out / "length.md").read_text()

    cmd = [*base, "sweep", *common, "--configs", "monitor,das_0.1", "--final-test"]
    first = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "sweep.json").read_text())
    assert report["config"]["steps"] == 1  # the length the length curve chose
    assert set(report["validation"]) == {"monitor", "das_0.1"} and report["chosen"] in report["validation"]
    assert report["flags"]["das_0.1"] == ["--basic_lambda_das", "0.1"]
    for name in ("monitor", "das_0.1"):
        evals = [json.loads((out / "steps1" / name / f"seed{s}" / "eval_val.json").read_text()) for s in (0, 1)]
        assert all(e["split"] == "val" and e["n"] == 10 for e in evals)
        assert report["validation"][name]["per_seed_calibrated"] == [e["calibrated_accuracy"] for e in evals]
        assert json.loads((out / "steps1" / name / "seed0" / "eval_test.json").read_text())["split"] == "test"
    versus = report["test_vs_reference"]["das_0.1"]["calibrated"]
    assert versus["seeds"] == 2 and versus["seeds_ahead"] + versus["seeds_behind"] + versus["seeds_tied"] == 2
    assert isinstance(report["beats_reference_on_test"], list) and (out / "sweep.png").is_file()
    assert report["chosen"] == "das_0.1"  # the only BASIC setting; the monitor arm is its reference
    assert isinstance(report["chosen_beats_reference_on_val"], bool) and report["machine"]["cpu_capability"]
    logged = json.loads((out / "steps1" / "das_0.1" / "seed0" / "sweep_result.json").read_text())["log_history"]
    last = [e["basic_weighted_cos"] for e in logged if "basic_weighted_cos" in e and "train_runtime" not in e]
    assert report["health"]["das_0.1"][0]["basic_weighted_cos"] == pytest.approx(sum(last[-5:]) / len(last[-5:]))
    assert (out / "curves.png").is_file() and "BASIC's share (max)" in (out / "sweep.md").read_text()
    assert "(chosen)" in (out / "sweep.md").read_text()
    before = (out / "steps1" / "monitor" / "seed0" / "mm_projector.bin").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and (out / "steps1" / "monitor" / "seed0" / "mm_projector.bin").stat().st_mtime_ns == before


def test_length_choice_rule():
    """Lengths whose checkpoints pass are tried shortest first on real runs; the first whose real runs all
    pass is chosen; without one, the longest."""
    from basic_plugin.lab.length import confirm_length

    curve = {100: [0.12, 0.35], 200: [0.31, 0.32], 300: [0.30, 0.40], 400: [0.5, 0.6]}
    real = {200: [0.29, 0.5], 300: [0.33, 0.31], 400: [0.5, 0.6]}
    tried = []

    def runs(steps):
        tried.append(steps)
        return {"steps": steps, "calibrated": real[steps], "raw": real[steps]}

    got = confirm_length(curve, runs)
    assert got["chosen_steps"] == 300 and tried == [200, 300] and got["all_seeds_above"] is True
    assert [r["steps"] for r in got["confirmed"]] == [200, 300]
    low = confirm_length({100: [0.1, 0.2], 400: [0.25, 0.5]}, runs)
    assert low["chosen_steps"] == 400 and low["all_seeds_above"] is False and "no length" in low["why"]
    real[300] = [0.2, 0.2]
    assert confirm_length(curve, runs)["chosen_steps"] == 400  # 200 and 300 fail on real runs, 400 passes


def test_sweep_without_a_length_is_refused(tmp_path):
    res = subprocess.run([sys.executable, "-m", "basic_plugin.cli", "sweep", "--out", str(tmp_path / "g")],
                         cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("error: --steps: no training length given")


def test_seed_comparison_against_a_plain_computation():
    """compare_seeds: per-seed differences, seeds each way, the pooled mean, its image-resampling interval
    (the same images drawn for every seed) and the t interval over seeds, written out by hand."""
    import random
    import statistics

    from basic_plugin.lab.demo.evaluate import compare_seeds

    rng = random.Random(3)
    a = [[rng.random() < 0.3 for _ in range(40)] for _ in range(4)]
    b = [[rng.random() < p for _ in range(40)] for p in (0.5, 0.2, 0.4, 0.3)]
    c = compare_seeds(a, b, iters=4000, seed=1)
    per_seed = [(sum(y) - sum(x)) / 40 for x, y in zip(a, b)]
    assert c["per_seed_diff"] == pytest.approx(per_seed)
    assert c["diff"] == pytest.approx(statistics.fmean(per_seed))
    assert (c["seeds_ahead"], c["seeds_behind"], c["seeds_tied"]) == (
        sum(d > 0 for d in per_seed), sum(d < 0 for d in per_seed), sum(d == 0 for d in per_seed))
    half = 3.182446305284263 * statistics.stdev(per_seed) / 2  # t(0.975, 3 df) * s / sqrt(4)
    assert c["seed_mean_ci"] == pytest.approx((c["diff"] - half, c["diff"] + half))
    # the interval: images drawn with replacement, the same draw for every seed (a plain loop)
    import numpy as np

    picks = np.random.default_rng(1).integers(0, 40, size=(4000, 40))
    stats = sorted(statistics.fmean(statistics.fmean(float(b[s][i]) - float(a[s][i]) for i in row) for s in range(4))
                   for row in picks.tolist())
    assert c["diff_ci"] == pytest.approx((stats[100], stats[3899]))
    assert c["diff_ci"][0] <= c["diff"] <= c["diff_ci"][1]


def test_the_bar_for_beating_the_baseline():
    from basic_plugin.lab.sweep import beats

    base = {"seeds": 4, "diff_ci": (0.001, 0.05), "seeds_ahead": 3}
    assert beats(base)
    assert not beats({**base, "seeds_ahead": 2})  # interval above 0 but only 2 of 4 seeds ahead
    assert not beats({**base, "diff_ci": (-0.001, 0.05)})  # 3 of 4 ahead but the interval reaches 0


def test_unknown_config_is_refused():
    res = subprocess.run([sys.executable, "-m", "basic_plugin.cli", "sweep", "--configs", "paper,nope"],
                         cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("error: --configs: unknown nope")


def test_code_version_names_the_commit_and_the_uncommitted_changes(tmp_path, monkeypatch):
    from basic_plugin.lab import provenance

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    version = provenance.code_version()
    assert version["commit"] == head
    diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO_ROOT, capture_output=True).stdout
    assert (version["dirty"] is None) == (not diff)
