"""Which code and which CPU kernels a run used, stored with its results.

The second matters at this scale: the same code, data and seed give a different step-1 loss when
oneDNN picks AVX2 instead of AVX-512 kernels, and a run's end point can follow (docs/RESULTS.md).
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path


def code_version() -> dict:
    """The commit the runs used, and a hash of uncommitted changes (so results can be traced)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=30).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": hashlib.sha256(diff).hexdigest()[:16] if diff else None}


#: environment variables that choose CPU kernels (and so change float rounding)
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
              "MKL_CBWR", "OMP_NUM_THREADS")


def machine() -> dict:
    """The CPU and the kernel choices that decide a run's rounding: model name, torch's vector
    capability, the kernel-choosing environment variables that are set, and the torch version."""
    import torch

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}
