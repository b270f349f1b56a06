"""``basic-llava bench``: what BASIC costs, in memory and time, measured side by side.

One run (see docs/PERFORMANCE.md) measures:

1. the loss module at LLaVA-1.5-7B shapes, naive vs chunked (the separate functions) vs fused
   (one shared student-gradient buffer, the training path): peak extra memory and time
   per batch size (:mod:`~basic_plugin.lab.bench.loss_memory`, measured with
   :mod:`~basic_plugin.lab.bench.accounting`);
2. a whole training step with BASIC on vs off (:mod:`~basic_plugin.lab.bench.step`) on
   the models of :mod:`~basic_plugin.lab.bench.models`;
3. BASIC's analytical FLOP share (:mod:`~basic_plugin.lab.bench.flops`), against which
   the measured step overhead is judged;

and prints it all, with PASS/MISS against the targets
(:mod:`~basic_plugin.lab.bench.report`). This module is the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from basic_plugin.host.usage import CommandParser
from basic_plugin.lab.bench.flops import reference_flop_rows
from basic_plugin.lab.bench.loss_memory import LAMBDA_SDS, measure_loss_cases
from basic_plugin.lab.bench.machine import loadavg, machine_info
from basic_plugin.lab.bench.models import STEP_MODELS
from basic_plugin.lab.bench.report import evaluate_targets, print_report
from basic_plugin.lab.bench.step import measure_steps

__all__ = ["build_parser", "run", "main"]


def _parse_ints(text: str) -> List[int]:
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        "bench",
        description="BASIC's memory and time cost, naive vs chunked loss and whole training steps "
                    "(see docs/PERFORMANCE.md).")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the loss inputs (the math runs in fp32 either way)")
    p.add_argument("--batches", type=_parse_ints, default=[1, 4, 8, 16],
                   help="batch sizes (images) whose memory is accounted (default 1,4,8,16)")
    p.add_argument("--time-batches", type=_parse_ints, default=None,
                   help="batch sizes also run for real (time + allocator peak); default 1,4 on CPU, "
                        "all --batches on CUDA or with --full")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per loss case, interleaved across paths (default 2; 3 with --full)")
    p.add_argument("--chunk-size", type=_parse_ints, default=[256],
                   help="rows per chunk of the chunked and fused paths (default 256, the training default); a "
                        "comma list adds paths chunked-<c> / fused-<c>, the first one is the one the targets use")
    p.add_argument("--hidden", type=int, default=4096, help="d (default 4096, LLaVA-1.5-7B)")
    p.add_argument("--vocab", type=int, default=32000, help="|V| (default 32000)")
    p.add_argument("--image-tokens", type=int, default=576, help="m per image (default 576)")
    p.add_argument("--steps", default=None,
                   help="whole-step models, comma list of tiny,mini-shaped,mini (default tiny,mini-shaped; "
                        "'none' to skip)")
    p.add_argument("--mini", action="store_true", help="also time the real-parts mini-LLaVA if installed")
    p.add_argument("--mini-dir", default=None, help="a mini-LLaVA folder with lm/ and vision/ (implies --mini)")
    p.add_argument("--stages", default=None,
                   help="stages of the whole-step runs: pretrain,finetune (default pretrain; both with --full)")
    p.add_argument("--step-batch", type=int, default=1, help="samples per whole step (default 1)")
    p.add_argument("--step-repeats", type=int, default=None,
                   help="timed steps per setting after one warm-up round (default: tiny 10, others 3; "
                        "with --full tiny 20, others 5)")
    p.add_argument("--full", action="store_true",
                   help="time every --batches size with 3 repeats, both stages, more step repeats")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 matmuls (LLaVA's scripts train with --tf32 True); default: torch's default")
    p.add_argument("--no-allocator", action="store_true", help="skip the allocator cross-check")
    p.add_argument("--json", default=None, metavar="PATH", help="write all numbers as JSON")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


class _Progress:
    """A tqdm bar on stderr (or none); notes go above it, or to stderr without it."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="bench", unit="job", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def set(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args) -> Dict[str, object]:
    """Every measurement ``args`` asks for, and the targets judged from them, as one report."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(max(1, int(threads)))
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    repeats = args.repeats or (3 if args.full else 2)
    if args.time_batches is not None:
        time_batches = list(args.time_batches)
    elif args.full or device.type == "cuda":
        time_batches = list(args.batches)
    else:
        time_batches = [b for b in args.batches if b <= 4]
    batches = sorted(set(args.batches) | set(time_batches))
    steps = args.steps or "tiny,mini-shaped"
    step_models = [] if steps == "none" else [s.strip() for s in steps.split(",") if s.strip()]
    if (args.mini or args.mini_dir) and "mini" not in step_models:
        step_models.append("mini")
    for s in step_models:
        if s not in STEP_MODELS:
            raise SystemExit(f"--steps: unknown model {s!r} ({', '.join(STEP_MODELS)})")
    stages = [s.strip() for s in (args.stages or ("pretrain,finetune" if args.full else "pretrain")).split(",")]
    for s in stages:
        if s not in ("pretrain", "finetune"):
            raise SystemExit(f"--stages: unknown stage {s!r}")

    def step_repeats(name: str) -> int:
        if args.step_repeats:
            return args.step_repeats
        if name == "tiny":
            return 20 if args.full else 10
        return 5 if args.full else 3
    paths = [("naive", None)] + [("chunked" if i == 0 else f"chunked-{cs}", cs)
                                 for i, cs in enumerate(args.chunk_size)]

    report: Dict[str, object] = {
        "machine": machine_info(device),
        "command": "basic-llava bench " + " ".join(
            sys.argv[1:] if getattr(args, "_argv", None) is None else args._argv),
        "settings": {"dtype": args.dtype, "hidden": args.hidden, "vocab": args.vocab,
                     "image_tokens": args.image_tokens, "chunk_size": args.chunk_size, "batches": batches,
                     "threads": torch.get_num_threads(), "tf32": bool(args.tf32),
                     "time_batches": time_batches, "repeats": repeats, "lambda_sds": LAMBDA_SDS,
                     "step_models": step_models, "stages": stages, "step_batch": args.step_batch,
                     "step_repeats": {n: step_repeats(n) for n in step_models}},
    }
    report["loadavg_start"] = loadavg()
    total_jobs = len(batches) * len(paths) + len(time_batches) * len(paths) * repeats \
        + sum(len(stages) * (step_repeats(n) + 1) for n in step_models)
    progress = _Progress(total_jobs, not args.no_progress)
    started = time.perf_counter()
    report["loss"] = measure_loss_cases(
        batches=batches, time_batches=time_batches, paths=paths, repeats=repeats, image_tokens=args.image_tokens,
        hidden=args.hidden, vocab_size=args.vocab, dtype=dtype, device=device, allocator=not args.no_allocator,
        progress=progress)
    report["steps"], report["step_notes"] = measure_steps(
        step_models, stages, batch=args.step_batch, repeats=step_repeats, device=device, mini_dir=args.mini_dir,
        progress=progress)
    report["flops"] = reference_flop_rows()
    progress.close()
    report["elapsed_s"] = time.perf_counter() - started
    report["loadavg_end"] = loadavg()
    report["targets"] = evaluate_targets(report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``basic-llava bench [options]``: run, print the report, optionally write it as JSON."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = None if argv is None else list(argv)
    report = run(args)
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0
