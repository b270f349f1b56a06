"""Training runs for the tests, through :mod:`basic_plugin.lab.launch` (the demo's launcher too).

``run_training("tests._vanilla_train", args, output_dir=out)`` runs
``python -m tests._vanilla_train <args>``; with ``deepspeed_ranks=N`` it runs DeepSpeed's
launcher with N ranks instead. A failed run fails the test (``AssertionError`` with the output).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

from basic_plugin.lab import launch
from basic_plugin.lab.launch import OFFLINE_ENV  # noqa: F401  (conftest.py sets it)

REPO_ROOT = Path(__file__).resolve().parents[1]


def training_env(env: Optional[Mapping[str, str]] = None, *,
                 deepspeed_ranks: Optional[int] = None) -> Dict[str, str]:
    """The environment for a training subprocess: offline, repo importable, CPU friendly."""
    return launch.environment(env, ranks=deepspeed_ranks)


def training_command(module: str, args: Iterable[str], *,
                     deepspeed_ranks: Optional[int] = None,
                     master_port: Optional[int] = None) -> list:
    """The command line :func:`run_training` runs."""
    return launch.command(module, args, ranks=deepspeed_ranks, master_port=master_port)


def run_training(module: str, args: Iterable[str], *, output_dir, deepspeed_ranks: Optional[int] = None,
                 env: Optional[Mapping[str, str]] = None, timeout: float = 600) -> dict:
    """:func:`basic_plugin.lab.launch.run` (its result), failing the test when the run fails.

    The log is ``<output_dir>.log`` beside the run folder.
    """
    __tracebackhide__ = True
    try:
        return launch.run(module, args, output_dir=output_dir, ranks=deepspeed_ranks, env=env, timeout=timeout)
    except launch.TrainingFailed as failure:
        raise AssertionError(str(failure)) from None


def install_distribution(site, name: str, version: str = "0.1", entry_points: Optional[Mapping[str, str]] = None,
                         group: str = "llava") -> Path:
    """Make ``site`` (a folder for ``sys.path`` / ``PYTHONPATH``) hold an installed distribution ``name``: its
    dist-info, with ``entry_points`` (name -> module) in ``group``, as pip would leave it. Returns ``site``."""
    site = Path(site)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if entry_points:
        (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    return site


def all_finite(values: Iterable[float]) -> bool:
    """True when every value is a finite float (and there is at least one)."""
    values = list(values)
    return bool(values) and all(math.isfinite(v) for v in values)


def collate_right_padded(samples):
    """(ids, mask) for lists of token ids, right-padded as LLaVA's collator does (pad id 0)."""
    import torch

    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for b, s in enumerate(samples):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = True
    return ids, mask


def write_idx(path, array, gz: bool = True) -> None:
    """An idx file written by hand: 0, 0, type 0x08 (ubyte), rank, big-endian dims, data."""
    import gzip
    import struct

    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


def write_synthetic_fmnist(folder):
    """A Fashion-MNIST-shaped folder: 3 train and 2 test images per class, each class a distinct pattern."""
    import numpy as np

    from basic_plugin.lab.demo import data as demo_data

    folder = Path(folder)
    rng = np.random.default_rng(0)
    for split, per in (("train", 3), ("test", 2)):
        labels = np.repeat(np.arange(10), per)
        rng.shuffle(labels)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y:2 * y + 6, 4:24] = 200 + rng.integers(0, 55)
        img_name, lab_name = demo_data.FMNIST_FILES[split]
        write_idx(folder / img_name, images)
        write_idx(folder / lab_name, labels)
    return folder
