"""``basic-llava length``: the training length of the grid, chosen on the monitor arm alone.

Before any BASIC setting is compared, the yardstick is fixed: the monitor arm (BASIC on with both
lambdas 0, which trains bit for bit like the baseline) trains for the longest length with every
seed, saving its projector along the way, and each saved projector is scored on the **validation**
split (calibrated zero-shot accuracy). The chosen length is the shortest one at which every seed
is clearly above chance (calibrated accuracy >= ``--threshold``, 30% by default, chance is 10%);
when no length gets there, the longest is chosen and the report says so plainly.

A point of the curve below the longest length is a checkpoint of the longest run: the same batches
as a run of that length (same data, seed and order), but with the learning-rate schedule of the
longest run (higher, and not yet decayed), so it is a proxy. The choice is therefore confirmed on
real runs: the lengths whose checkpoints pass are tried shortest first, the monitor arm trains at
that length for every seed (the sweep's own runs, reused by the grid), and the first length whose
every real run passes is chosen; the longest length's runs are real runs already.

    basic-llava length --out runs/grid          # then: basic-llava sweep --out runs/grid --final-test

Outputs under ``--out``: ``length.json``, ``length.md``, ``length.png``; the runs are the sweep's
own (``<out>/steps<N>/monitor/seed<s>``), so the sweep reuses them when it trains that length.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from basic_plugin.host.refusal import print_refusal
from basic_plugin.host.usage import CommandParser

LENGTHS = (100, 200, 300, 400)
THRESHOLD = 0.30


def row(steps: int, evals: Sequence[dict]) -> dict:
    """One length's validation results, per seed."""
    return {"steps": steps, "calibrated": [e["calibrated_accuracy"] for e in evals], "raw": [e["accuracy"] for e in evals],
            "caption_loss": [statistics.fmean(e["true_nll"]) for e in evals]}


def confirm_length(curve: Dict[int, List[float]], real_runs, threshold: float = THRESHOLD) -> dict:
    """The shortest length whose real runs (``real_runs(steps)`` -> a :func:`row`) all reach ``threshold``,
    trying only the lengths whose checkpoints (``curve``) all reach it, shortest first; else the longest."""
    confirmed = []
    for steps in sorted(curve):
        if min(curve[steps]) < threshold:
            continue
        result = real_runs(steps)
        confirmed.append(result)
        if min(result["calibrated"]) >= threshold:
            return {"chosen_steps": steps, "all_seeds_above": True, "confirmed": confirmed,
                    "why": f"the shortest length whose checkpoints and real runs all reach {100 * threshold:.0f}% "
                           f"calibrated on validation (lowest seed of the real runs {100 * min(result['calibrated']):.1f}%)"}
    longest = max(curve)
    return {"chosen_steps": longest, "confirmed": confirmed, "all_seeds_above": False,
            "why": f"no length gets every seed's real run to {100 * threshold:.0f}% calibrated on validation; the "
                   f"longest, {longest} steps, is used (lowest seed {100 * min(curve[longest]):.1f}%)"}


def build_parser() -> argparse.ArgumentParser:
    from basic_plugin.lab.sweep import add_workspace_options

    p = CommandParser("length", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_workspace_options(p)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                   help="comma-separated training lengths in steps, each a multiple of --save-every "
                        f"(default {','.join(map(str, LENGTHS))})")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help=f"calibrated validation accuracy every seed must reach (default {THRESHOLD})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basic_plugin.lab.argv import strip_separator
    from basic_plugin.lab.sweep import (MONITOR_FLAGS, checkpoints, evaluate_run, in_pairs, train_run, workspace)

    args = build_parser().parse_args(strip_separator(argv))
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] < 1:
        return print_refusal(f"--lengths {args.lengths!r} is invalid; allowed: comma-separated integers >= 1")
    ws = workspace(args)
    bad = [n for n in lengths if n % ws.cfg["save_every"]]
    if bad:
        return print_refusal(f"--lengths {args.lengths}: {bad} not multiples of --save-every {ws.cfg['save_every']}; "
                      "allowed: multiples of it")
    longest, seeds = lengths[-1], list(range(ws.cfg["seeds"]))

    def train_and_score(seed):
        run = train_run(ws, "monitor", seed, longest, MONITOR_FLAGS)
        saved = checkpoints(run)
        missing = [n for n in lengths[:-1] if n not in saved]
        if missing:
            raise RuntimeError(f"{run}: no checkpoint for steps {missing}")
        folders = {n: saved[n] for n in lengths[:-1]}
        folders[longest] = run
        return {n: evaluate_run(ws, folder, "val") for n, folder in folders.items()}

    per_seed = in_pairs(seeds, train_and_score)
    rows = [row(n, [per_seed[s][n] for s in seeds]) for n in lengths]
    curve = {r["steps"]: r["calibrated"] for r in rows}

    def real_runs(n):
        """The monitor arm trained for ``n`` steps with every seed, scored on validation."""
        if n == longest:
            return rows[-1]
        return row(n, in_pairs(seeds, lambda seed: evaluate_run(ws, train_run(ws, "monitor", seed, n, MONITOR_FLAGS),
                                                                  "val")))

    report = {"seeds": seeds, "threshold": args.threshold, "rows": rows,
              **confirm_length(curve, real_runs, args.threshold)}
    (ws.out / "length.json").write_text(json.dumps(report, indent=1))
    (ws.out / "length.md").write_text(markdown(report))
    plot(report, ws.out / "length.png")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    seeds, rows = report["seeds"], report["rows"]
    lines = ["The monitor arm's calibrated validation accuracy (%) against training steps (checkpoints of one "
             f"{rows[-1]['steps']}-step run per seed):", "",
             "| steps | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | lowest | raw, mean | caption loss, mean |",
             "|---:|" + "---:|" * (len(seeds) + 4)]
    for r in rows:
        cal = r["calibrated"]
        lines.append(f"| {r['steps']} | " + " | ".join(f"{100 * x:.1f}" for x in cal) +
                     f" | {100 * statistics.fmean(cal):.1f} | {100 * min(cal):.1f} | {100 * statistics.fmean(r['raw']):.1f} | "
                     f"{statistics.fmean(r['caption_loss']):.3f} |")
    for r in report.get("confirmed", []):
        lines += ["", f"Real runs of {r['steps']} steps (the monitor arm trained for that length, every seed): "
                      "calibrated " + " / ".join(f"{100 * x:.1f}" for x in r["calibrated"]) +
                      f"% (mean {100 * statistics.fmean(r['calibrated']):.1f}%), raw " +
                      " / ".join(f"{100 * x:.1f}" for x in r["raw"]) + "%."]
    lines += ["", f"Chosen: **{report['chosen_steps']} steps**: {report['why']}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from basic_plugin.lab.plots import save, subplots

    rows = report["rows"]
    lengths = [r["steps"] for r in rows]
    fig, ax = subplots(figsize=(5.5, 3.6))
    for i, s in enumerate(report["seeds"]):
        ax.plot(lengths, [100 * r["calibrated"][i] for r in rows], marker="o", lw=1.2, label=f"seed {s}")
    ax.plot(lengths, [100 * statistics.fmean(r["calibrated"]) for r in rows], color="black", lw=2.2, label="mean")
    for r in report.get("confirmed", []):
        ax.scatter([r["steps"]] * len(r["calibrated"]), [100 * x for x in r["calibrated"]], marker="x", color="black",
                   zorder=3, label="real runs of that length" if r is report["confirmed"][0] else None)
    ax.axhline(100 * report["threshold"], color="C3", ls="--", lw=1, label=f"threshold {100 * report['threshold']:.0f}%")
    ax.axhline(10, color="0.7", ls=":", lw=1, label="chance")
    ax.axvline(report["chosen_steps"], color="0.5", lw=1)
    ax.set_xlabel("training steps (batch 8)")
    ax.set_ylabel("calibrated validation accuracy (%)")
    ax.set_title("monitor arm (= baseline): length curve", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, path, dpi=110)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
