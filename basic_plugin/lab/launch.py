"""One launcher for training runs, used by the demo and the tests.

``run("basic_plugin.train", args, output_dir=out)`` runs ``python -m basic_plugin.train ARGS``;
with ``ranks=N`` it runs DeepSpeed's launcher instead::

    python -m deepspeed.launcher.runner --num_gpus N --master_port <free> --module basic_plugin.train ARGS

(the same as the ``deepspeed`` console script). On CPU ``--num_gpus N`` is what sets the number
of ranks (without it the CPU accelerator counts NUMA nodes); DeepSpeed then picks its CPU
accelerator and gloo by itself.

The child gets an offline, CPU-friendly environment (:func:`environment`), writes its output to
a log file, and its progress as JSON lines to the file named by ``BASIC_LLAVA_PROGRESS``
(:mod:`basic_plugin.host.progress`), which :func:`run` reads while it waits. A timeout kills the
whole process group (the launcher and its ranks).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Nothing may reach a model hub.
OFFLINE_ENV: Dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
#: Unbuffered output, no tokenizer thread pools, no experiment tracker.
CHILD_ENV: Dict[str, str] = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}

#: Inherited variables that would make a child think it is already one rank of a job.
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
             "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK", "LOCAL_WORLD_SIZE")

PROGRESS_ENV = "BASIC_LLAVA_PROGRESS"  # as basic_plugin.host.progress.PROGRESS_ENV (kept import-free)
OUTPUT_TAIL = 15000
_POLL_S = 0.5


class TrainingFailed(RuntimeError):
    """A run that exited non-zero, timed out or left no ``trainer_state.json``; the message ends with its output."""

    def __init__(self, message: str, *, cmd: List[str], output: str, log: Path, returncode: Optional[int]):
        super().__init__(f"{message}\ncommand: {shlex.join(cmd)}\n----- output (tail) -----\n{output[-OUTPUT_TAIL:]}")
        self.cmd, self.output, self.log, self.returncode = cmd, output, log, returncode


def free_port() -> int:
    """A TCP port that was free a moment ago (for ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(module: str, args: Iterable[object], *, ranks: Optional[int] = None,
            master_port: Optional[int] = None) -> List[str]:
    """``python -m MODULE ARGS``, or DeepSpeed's launcher with ``ranks`` ranks."""
    args = [str(a) for a in args]
    if not ranks:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(int(ranks)),
            "--master_port", str(master_port or free_port()), "--module", module, *args]


def environment(env: Optional[Mapping[str, object]] = None, *, ranks: Optional[int] = None,
                threads: Optional[int] = None) -> Dict[str, str]:
    """The child's environment: this one without rank variables, offline, the repository importable.

    ``threads``: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of each rank; by default inherited with
    one rank, and the cores shared out with more (or they oversubscribe and crawl).
    ``env`` is applied last.
    """
    child = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    child.update(OFFLINE_ENV)
    child.update(CHILD_ENV)
    child["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p])
    if not threads and ranks and ranks > 1:
        threads = max(1, (os.cpu_count() or 1) // ranks)
    if threads:
        child["OMP_NUM_THREADS"] = child["MKL_NUM_THREADS"] = str(threads)
    child.update({k: str(v) for k, v in (env or {}).items()})
    return child


def read_progress(path: Path, offset: int = 0) -> List[dict]:
    """The complete JSON lines of a progress file from byte ``offset`` on (see :class:`_ProgressReader`)."""
    return _ProgressReader(Path(path), offset).read()


class _ProgressReader:
    """Reads the lines appended to a progress file since the last call; a partial last line waits."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = path, offset

    def read(self) -> List[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(module: str, args: Iterable[object], *, output_dir, ranks: Optional[int] = None,
        env: Optional[Mapping[str, object]] = None, threads: Optional[int] = None, timeout: float = 600,
        log_path: Optional[Path] = None, progress_path: Optional[Path] = None, command_file: Optional[Path] = None,
        on_progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Run ``module`` with ``args`` (see :func:`command`, :func:`environment`) and wait for it.

    ``output_dir`` must be the run's ``--output_dir`` (it is appended when ``args`` lack one).
    The output goes to ``log_path`` (default ``<output_dir>.log`` beside the folder, so a run
    refused before it starts leaves no folder), the progress to ``progress_path`` (default
    ``<log>.progress.jsonl``, emptied first; ``BASIC_LLAVA_PROGRESS`` in ``env`` wins), the
    command line to ``command_file`` when given. ``on_progress`` gets each progress record
    while the run goes on.

    Raises :class:`TrainingFailed` on a non-zero exit, on a timeout (the whole process group is
    killed) or when no ``trainer_state.json`` was written. Returns ``{"log_history", "losses",
    "steps", "progress", "output_dir", "trainer_state", "log", "progress_path", "output", "cmd",
    "wall_s"}``: ``losses``/``steps`` are the per-step training losses (the entries of
    ``log_history`` that have ``loss``), ``progress`` the records of the progress file.
    """
    args = [str(a) for a in args]
    output_dir = Path(output_dir)
    if "--output_dir" in args:
        given = Path(args[args.index("--output_dir") + 1])
        if given.resolve() != output_dir.resolve():
            raise ValueError(f"--output_dir {given} in args differs from output_dir={output_dir}")
    else:
        args += ["--output_dir", str(output_dir)]
    log_path = Path(log_path) if log_path else output_dir.parent / f"{output_dir.name}.log"
    child_env = environment(env, ranks=ranks, threads=threads)
    progress_path = Path(child_env.get(PROGRESS_ENV) or progress_path or log_path.with_suffix(".progress.jsonl"))
    child_env[PROGRESS_ENV] = str(progress_path)
    cmd = command(module, args, ranks=ranks)

    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress_path.unlink(missing_ok=True)
    if command_file:
        Path(command_file).write_text(shlex.join(cmd) + "\n")
    reader = _ProgressReader(progress_path)
    records: List[dict] = []

    def collect() -> None:
        for record in reader.read():
            records.append(record)
            if on_progress:
                on_progress(record)

    start = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    collect()
                if time.monotonic() - start > timeout:
                    timed_out = True
                    break
        except BaseException:  # an interrupt, or on_progress failing: no rank is left behind
            _kill_group(proc)
            raise
        if timed_out:  # the launcher starts its ranks in the same (new) session: kill them all
            _kill_group(proc)
    wall_s = time.monotonic() - start
    collect()
    output = log_path.read_text(encoding="utf-8", errors="replace")

    def fail(message: str) -> None:
        raise TrainingFailed(message, cmd=cmd, output=output, log=log_path, returncode=proc.returncode)

    if timed_out:
        fail(f"training timed out after {timeout:g} s (log: {log_path})")
    if proc.returncode != 0:
        fail(f"training exited with code {proc.returncode} (log: {log_path})")
    state_path = output_dir / "trainer_state.json"
    if not state_path.is_file():
        fail(f"no {state_path} after training (log: {log_path})")
    log_history = json.loads(state_path.read_text())["log_history"]
    return {
        "log_history": log_history,
        "losses": [float(e["loss"]) for e in log_history if "loss" in e],
        "steps": [e["step"] for e in log_history if "loss" in e],
        "progress": records,
        "output_dir": output_dir,
        "trainer_state": state_path,
        "log": log_path,
        "progress_path": progress_path,
        "output": output,
        "cmd": cmd,
        "wall_s": wall_s,
    }
