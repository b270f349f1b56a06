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


def test_tiny_sweep_selects_on_validation_tests_once_and_resumes(fmnist, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "basic_plugin.cli", "sweep", "--tiny", "--quiet", "--configs", "monitor,das_0.1",
           "--seeds", "1", "--final-test", "--fmnist-dir", str(fmnist), "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "sweep.json").read_text())
    assert set(report["validation"]) == {"monitor", "das_0.1"} and report["chosen"] in report["validation"]
    assert report["flags"]["das_0.1"] == ["--basic_lambda_das", "0.1"]
    for name in ("monitor", "das_0.1"):
        ev = json.loads((out / name / "seed0" / "eval_val.json").read_text())
        assert ev["split"] == "val" and ev["n"] == 10
        assert report["validation"][name]["calibrated_accuracy"] == pytest.approx(ev["calibrated_accuracy"])
        assert json.loads((out / name / "seed0" / "eval_test.json").read_text())["split"] == "test"
    assert "vs_reference" in report["test"]["das_0.1"] and (out / "sweep.png").is_file()
    assert report["chosen"] == "das_0.1"  # the only BASIC setting; the monitor arm is its reference
    assert isinstance(report["chosen_beats_reference_on_val"], bool) and report["machine"]["cpu_capability"]
    logged = json.loads((out / "das_0.1" / "seed0" / "sweep_result.json").read_text())["log_history"]
    last = [e["basic_weighted_cos"] for e in logged if "basic_weighted_cos" in e and "train_runtime" not in e]
    assert report["health"]["das_0.1"][0]["basic_weighted_cos"] == pytest.approx(sum(last[-5:]) / len(last[-5:]))
    assert (out / "curves.png").is_file() and "BASIC's share (max)" in (out / "sweep.md").read_text()
    assert "(chosen)" in (out / "sweep.md").read_text()
    before = (out / "monitor" / "seed0" / "mm_projector.bin").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=training_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and (out / "monitor" / "seed0" / "mm_projector.bin").stat().st_mtime_ns == before


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
