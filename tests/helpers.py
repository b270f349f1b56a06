"""Run a LLaVA-style training entry module in a subprocess, with or without DeepSpeed, on CPU.

``run_training("tests._vanilla_train", args, output_dir=out)`` runs
``python -m tests._vanilla_train <args>``; with ``deepspeed_ranks=N`` it runs DeepSpeed's
launcher instead::

    python -m deepspeed.launcher.runner --num_gpus N --master_port <free> \
        --module tests._vanilla_train <args>

(the same as the ``deepspeed`` console script).  On CPU ``--num_gpus N`` is what sets the
number of ranks (without it the CPU accelerator counts NUMA nodes); DeepSpeed then picks its
CPU accelerator and gloo by itself.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Environment every training subprocess gets: nothing may reach a model hub.
OFFLINE_ENV: Dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

# Inherited variables that would make a child think it is already one rank of a job.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "LOCAL_WORLD_SIZE")

_OUTPUT_TAIL = 15000


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_env(env: Optional[Mapping[str, str]] = None, *,
                 deepspeed_ranks: Optional[int] = None) -> Dict[str, str]:
    """The environment for a training subprocess: offline, repo importable, CPU friendly."""
    child = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    child.update(OFFLINE_ENV)
    child["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p])
    child["PYTHONUNBUFFERED"] = "1"
    child["TOKENIZERS_PARALLELISM"] = "false"
    child["WANDB_MODE"] = "disabled"
    if deepspeed_ranks and deepspeed_ranks > 1:
        # N ranks on few cores: one thread each, or they oversubscribe and crawl.
        child["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // deepspeed_ranks))
    if env:
        child.update({k: str(v) for k, v in env.items()})
    return child


def training_command(module: str, args: Iterable[str], *,
                     deepspeed_ranks: Optional[int] = None,
                     master_port: Optional[int] = None) -> list:
    """The command line :func:`run_training` runs."""
    args = [str(a) for a in args]
    if not deepspeed_ranks:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_gpus", str(int(deepspeed_ranks)),
            "--master_port", str(master_port or free_port()),
            "--module", module, *args]


def _fail(msg: str, cmd: list, output: str) -> None:
    tail = output[-_OUTPUT_TAIL:]
    raise AssertionError(f"{msg}\ncommand: {' '.join(cmd)}\n----- output (tail) -----\n{tail}")


def run_training(module: str, args: Iterable[str], *, output_dir, deepspeed_ranks: Optional[int] = None,
                 env: Optional[Mapping[str, str]] = None, timeout: float = 600) -> dict:
    """Run ``python -m <module> <args>`` (or under DeepSpeed's launcher with N ranks).

    ``output_dir`` must be the run's ``--output_dir`` (it is appended when ``args`` lack one).
    Fails (``AssertionError`` with the captured output) on a non-zero exit, a timeout (the
    whole process group is killed) or a missing ``trainer_state.json``.

    Returns ``{"log_history", "losses", "steps", "output_dir", "trainer_state", "log",
    "output", "cmd", "wall_s"}``: ``losses``/``steps`` are the per-step training losses
    (entries of ``log_history`` that have ``loss``), ``log`` the path of the saved output.
    """
    args = [str(a) for a in args]
    output_dir = Path(output_dir)
    if "--output_dir" in args:
        given = Path(args[args.index("--output_dir") + 1])
        if given.resolve() != output_dir.resolve():
            raise ValueError(f"--output_dir {given} in args differs from output_dir={output_dir}")
    else:
        args += ["--output_dir", str(output_dir)]
    cmd = training_command(module, args, deepspeed_ranks=deepspeed_ranks)
    child_env = training_env(env, deepspeed_ranks=deepspeed_ranks)

    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The launcher starts rank processes in the same (new) session: kill them all.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        _fail(f"training timed out after {timeout} s", cmd, output or "")
    wall_s = time.monotonic() - start

    log_path = output_dir.parent / f"{output_dir.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(output, encoding="utf-8")
    if proc.returncode != 0:
        _fail(f"training exited with code {proc.returncode} (log: {log_path})", cmd, output)

    state_path = output_dir / "trainer_state.json"
    if not state_path.is_file():
        _fail(f"no {state_path} after training", cmd, output)
    log_history = json.loads(state_path.read_text())["log_history"]
    steps = [e["step"] for e in log_history if "loss" in e]
    losses = [float(e["loss"]) for e in log_history if "loss" in e]
    return {
        "log_history": log_history,
        "losses": losses,
        "steps": steps,
        "output_dir": output_dir,
        "trainer_state": state_path,
        "log": log_path,
        "output": output,
        "cmd": cmd,
        "wall_s": wall_s,
    }


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
