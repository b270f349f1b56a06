"""The GPU check's code path on CPU (--tiny), its a_i reference, and its scripts' offline logic."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from basic_plugin.lab import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _constraint_pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "basic_plugin.lab.gpu_check", "--tiny", "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_tiny_cpu_summary_has_every_field(tiny_run):
    summary, stdout = tiny_run
    assert set(gpu_check.SUMMARY_FIELDS) <= set(summary)
    assert json.loads(stdout.strip().splitlines()[-1]) == summary  # the last stdout line is the JSON
    assert "BASIC GPU check: tiny on cpu" in stdout and "a_i (" in stdout  # the table
    assert summary["shape"] == "tiny" and summary["device"] == "cpu" and summary["pass"] is True
    assert (summary["warmup"], summary["repeats"]) == (1, 3)
    assert summary["thresholds"] == gpu_check.THRESHOLDS
    assert summary["attention"] == ["sdpa"] and summary["flash_attention"]["available"] is False
    assert [r["stage"] for r in summary["runs"]] == ["pretrain", "finetune"]
    for row in summary["runs"]:
        assert set(gpu_check.RUN_FIELDS) <= set(row)
        for key in ("step_off_s", "step_on_s", "ratio", "overhead", "flop_share", "overhead_limit", "loss_off",
                    "loss_on"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["stage"], key)
        assert row["ratio"] > 0 and 0 < row["flop_share"] < 1
        assert len(row["times_off"]) == len(row["times_on"]) == 3
        assert row["basic_terms_present"] is True and row["finite"] is True
        assert row["optimizer"] == "adamw" and row["gradient_checkpointing"] is True
        assert row["peak_on_bytes"] is None and row["memory_ratio"] is None  # CPU: no CUDA peak
        # timing is judged on CUDA at the full shape only
        assert row["verdict"] == {"overhead": "n/a", "memory": "n/a", "finite": "PASS"}
    assert summary["runs"][0]["trainable"] == "projector"
    assert summary["runs"][1]["trainable"] == "LLM + projector"


def test_tiny_cpu_a_i_matches_eager_attention(tiny_run):
    patch = tiny_run[0]["patch_weights"]
    assert set(gpu_check.PATCH_FIELDS) <= set(patch)
    assert patch["rows"] == gpu_check.TINY.ai_batch * gpu_check.TINY.tower.patches
    assert 0 < patch["max_a"] < 1
    assert patch["max_abs_diff"] < 1e-7 and patch["max_rel_diff"] < 1e-5
    assert patch["verdict"] == "PASS"


def test_reference_attention_mass_is_the_mean_over_layers_heads_and_later_text():
    g = torch.Generator().manual_seed(0)
    B, H, L, depth = 2, 3, 9, 2
    attentions = [torch.softmax(torch.randn(B, H, L, L, generator=g), -1) for _ in range(3)]
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 7:] = False
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    seq_index = torch.tensor([2, 3, 4, 1, 2])
    block_end = torch.tensor([4, 4, 4, 2, 2])
    got = gpu_check.reference_attention_mass(attentions, valid, batch_index, seq_index, block_end, depth)
    for r in range(5):
        b, i, e = batch_index[r].item(), seq_index[r].item(), block_end[r].item()
        queries = [j for j in range(e + 1, L) if valid[b, j]]
        want = sum(float(attentions[l][b, h, j, i]) for l in range(depth) for h in range(H) for j in queries)
        assert got[r].item() == pytest.approx(want / (depth * H * len(queries)), rel=1e-12)


def test_full_shape_is_llava_1_5_7b():
    full = gpu_check.FULL
    assert (full.llm.hidden, full.llm.layers, full.llm.heads, full.llm.ffn, full.llm.vocab) == (4096, 32, 32, 11008,
                                                                                                 32000)
    assert (full.tower.hidden, full.tower.layers, full.tower.patches) == (1024, 24, 576)
    assert full.batch == 16 and full.text == {"pretrain": (1, 40), "finetune": (35, 565)}


def test_arguments():
    args = gpu_check.parse_args(["--tiny", "--device", "cpu", "--stages", "finetune", "--attention", "sdpa"])
    assert args.tiny and args.stages == ["finetune"] and args.attention == ["sdpa"]
    assert (args.warmup, args.repeats) == (1, 3)
    for bad in (["--stages", "train"], ["--attention", "magic"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def _bash(*args, **kw):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw)


def test_gpu_wheels_list_is_pinned_and_offline():
    proc = _bash("scripts/gpu_wheels.sh", "--list")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    names = {name.lower().replace("_", "-") for name in pins}
    assert {"transformers", "tokenizers", "safetensors", "huggingface-hub", "pluggy", "llava-torch"} <= names
    assert not names & {"torch", "torchvision", "deepspeed", "numpy", "accelerate", "peft"}
    assert pins["transformers"] == "4.37.2"
    constraint = _constraint_pins()
    for name, version in pins.items():  # the CPU working set's pin wherever it has one
        key = name.lower().replace("_", "-")
        if key in constraint:
            assert version == constraint[key], name
    assert "# python versions: 3.10 3.11 3.12" in proc.stdout


def test_gpu_wheels_requirements_and_refusals():
    proc = _bash("scripts/gpu_wheels.sh", "--requirements")
    assert proc.returncode == 0, proc.stderr
    assert "transformers==4.37.2" in proc.stdout and "llava-torch==1.2.2.post1" in proc.stdout
    assert 'pillow==12.3.0; python_version == "3.10"' in proc.stdout  # no pillow 13 wheel for 3.10
    bad = _bash("scripts/gpu_wheels.sh", "--nope")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_gpu_check_dry_run_plans_an_offline_venv_install(tmp_path):
    venv = tmp_path / "venv"
    proc = _bash("scripts/gpu_check.sh", "--dry-run", "--venv", str(venv), "--tiny", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    plan = proc.stderr
    assert f"-m venv --system-site-packages {venv}" in plan
    assert "basic-llava-host-site.pth" in plan
    assert "pip install --no-index --find-links gpu_wheels" in plan and "-r gpu_wheels/requirements.txt" in plan
    assert "--no-deps -r gpu_wheels/requirements-no-deps.txt" in plan
    assert f"{venv}/bin/python -m basic_plugin.lab.gpu_check --tiny --device cpu --budget-s" in plan
    assert not venv.exists()


def test_gpu_check_refuses_without_wheels_or_with_bad_options(tmp_path):
    proc = _bash("scripts/gpu_check.sh", "--wheels", str(tmp_path), "--venv", str(tmp_path / "v"), "--tiny")
    assert proc.returncode == 2 and "scripts/gpu_wheels.sh" in proc.stderr
    assert not (tmp_path / "v").exists()
    proc = _bash("scripts/gpu_check.sh", "--timeout", "soon", "--dry-run")
    assert proc.returncode == 2 and "--timeout" in proc.stderr
