"""Step 1 of the demo's default BASIC arm: its logged terms under this machine's CPU kernels.

Runs 2 steps (same data, seed and arguments as ``basic-llava demo``; one thread) and prints
step 1's ``basic_das`` and ``lm_loss``. Kernel-choosing variables set in the environment reach
the run, e.g.::

    .venv/bin/python scripts/kernel_step1.py                          # this CPU's default kernels
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/kernel_step1.py  # oneDNN limited to AVX2

docs/RESULTS.md ("Why the recorded runs and the reruns differ") lists the values per setting.
"""
import json
import sys
import tempfile
from pathlib import Path

from basic_plugin.lab.assets import install_assets
from basic_plugin.lab.demo import data as demo_data
from basic_plugin.lab.demo.run import DEFAULTS, run_training, train_args
from basic_plugin.lab.provenance import machine


def main() -> int:
    assets = install_assets(None, progress=False)
    paths = {"lm": assets["llm"], "vision": assets["vision_112"]}
    with tempfile.TemporaryDirectory() as tmp:
        data = demo_data.build_dataset(Path(tmp) / "data", train=DEFAULTS["steps"] * DEFAULTS["batch"],
                                       test=DEFAULTS["test"], size=112, seed=0, progress=False)
        run_dir = Path(tmp) / "run"
        args = train_args(paths, data, run_dir, arm="basic", steps=2, batch=DEFAULTS["batch"], seed=0,
                          lr=DEFAULTS["lr"], deepspeed=True)
        result = run_training(args, run_dir, 2, deepspeed=True, desc="step 1", progress=False, threads=1)
    first = next(e for e in result["log_history"] if e.get("step") == 1 and "basic_das" in e)
    print(json.dumps({"basic_das": first["basic_das"], "lm_loss": first["lm_loss"], "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
