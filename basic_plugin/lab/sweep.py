"""``basic-llava sweep``: BASIC's settings on the demo's mini-LLaVA, chosen on a validation split.

A one-factor-at-a-time grid around the paper's defaults, every configuration with the same
seeds, data and steps as the demo, against the same reference arm:

==============  ==================================================  =============================
name            flags                                               question
==============  ==================================================  =============================
monitor         ``--basic True``, both lambdas 0                    the baseline (trains exactly
                                                                    like it) with BASIC's curves
paper           ``--basic True`` (lambda_das 1, lambda_sds 0.01)    the paper's weights
das_only        lambda_sds 0                                        the direction term alone
sds_only        lambda_das 0                                        the distribution term alone
das_0.3         lambda_das 0.3                                      a weaker direction term
das_0.1         lambda_das 0.1                                      weaker still
uniform         ``--basic_patch_weights uniform``                   which patches vs how much
depth_L4        ``--basic_depth`` L/4                               shallower target
==============  ==================================================  =============================

Selection uses a **validation split** (Fashion-MNIST training images that are neither trained
on nor in the test split) and one metric fixed before any result: the calibrated (PMI)
zero-shot accuracy, mean over seeds (the raw accuracy is dominated by how much the LLM likes
each class name; the calibrated one asks whether the image moved the caption's
likelihood). ``--final-test`` then evaluates **every** configuration once on the test split, with
intervals, and marks the one chosen on validation. Every run is kept and reused
(resumable: finished runs and evaluations are skipped), two at a time with one thread each.
The choice is made among the BASIC configurations; the monitor arm is the reference it is compared
with, and the report says whether the choice beats it. Outputs under ``--out``: ``sweep.json``,
``sweep.md`` (tables, with each configuration's health metrics at the end of training: what the
guard's thresholds are set from), ``sweep.png`` (accuracies) and ``curves.png`` (health per step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CONFIGS: Dict[str, List[str]] = {
    "monitor": ["--basic_lambda_das", "0", "--basic_lambda_sds", "0"],
    "paper": [],
    "das_only": ["--basic_lambda_sds", "0"],
    "sds_only": ["--basic_lambda_das", "0"],
    "das_0.3": ["--basic_lambda_das", "0.3"],
    "das_0.1": ["--basic_lambda_das", "0.1"],
    "uniform": ["--basic_patch_weights", "uniform"],
    "depth_L4": ["--basic_depth", "{L4}"],
}
SELECTION_METRIC = "calibrated_accuracy"
REFERENCE = "monitor"  # BASIC on, both lambdas 0: trains bit for bit like the baseline
DEFAULTS = {"steps": 100, "batch": 8, "seeds": 2, "val": 300, "test": 300}
TINY = {"steps": 2, "batch": 2, "seeds": 2, "val": 10, "test": 10}


def config_flags(name: str, layers: int) -> List[str]:
    return [f.replace("{L4}", str(max(1, layers // 4))) for f in CONFIGS[name]]


def summarise(evals: Sequence[dict]) -> dict:
    """Mean over seeds of the raw and calibrated accuracies and the held-out caption loss."""
    def mean(key):
        return statistics.fmean(e[key] for e in evals)

    return {"seeds": len(evals), "accuracy": mean("accuracy"), "calibrated_accuracy": mean("calibrated_accuracy"),
            "caption_loss": statistics.fmean(statistics.fmean(e["true_nll"]) for e in evals),
            "per_seed_calibrated": [e["calibrated_accuracy"] for e in evals]}


def select(val: Dict[str, dict]) -> str:
    """The BASIC configuration with the best mean calibrated validation accuracy (ties: the earlier
    listed). The reference arm is not a candidate (it is the baseline, not a BASIC setting) unless it
    is the only configuration; whether the choice beats it is reported next to the choice."""
    order = list(CONFIGS)
    candidates = [n for n in val if n != REFERENCE] or list(val)
    return max(sorted(candidates, key=order.index), key=lambda name: val[name][SELECTION_METRIC])


#: the logged health metrics summarised per run (docs/RESULTS.md reads them; the guard's thresholds come from them)
HEALTH_KEYS = ("lm_loss", "basic_weighted_cos", "basic_v_pairwise_cos", "basic_vhat_pairwise_cos", "basic_v_norm",
               "basic_vhat_norm", "basic_share")


def health_summary(log_history: Sequence[dict], window: int = 5) -> dict:
    """Per metric: the mean of the last ``window`` logging steps, and for the guard's two quantities
    (pairwise cosine of the projector tokens, BASIC's share) the largest ``window``-step mean."""
    out = {}
    for key in HEALTH_KEYS:
        ys = [float(e[key]) for e in log_history if key in e and "train_runtime" not in e]
        if not ys:
            continue
        out[key] = statistics.fmean(ys[-window:])
        if key in ("basic_v_pairwise_cos", "basic_share"):
            means = [statistics.fmean(ys[i:i + window]) for i in range(max(1, len(ys) - window + 1))]
            out[f"{key}_max_window"] = max(means)
    return out


def step_curves(log_history: Sequence[dict], key: str):
    pts = [(e["step"], float(e[key])) for e in log_history if key in e and "step" in e and "train_runtime" not in e]
    return [p[0] for p in pts], [p[1] for p in pts]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="basic-llava sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of the grid")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--val", type=int, default=None, help="validation images (held-out training images)")
    p.add_argument("--test", type=int, default=None, help="test images, used once with --test")
    p.add_argument("--final-test", "--test-once", dest="final_test", action="store_true",
                   help="after validation, evaluate every configuration once on the test split")
    p.add_argument("--fmnist-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny random model (tests only)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basic_plugin.lab.demo import data as demo_data
    from basic_plugin.lab.demo.evaluate import evaluate_model
    from basic_plugin.lab.demo.run import run_training, strip_separator, train_args
    from basic_plugin.lab.provenance import code_version, machine

    args = build_parser().parse_args(strip_separator(argv))
    cfg = dict(TINY if args.tiny else DEFAULTS)
    for key in ("seeds", "steps", "val", "test"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: --configs: unknown {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    if args.tiny:
        from basic_plugin.lab.tiny import IMAGE_SIZE, build_tiny_llava

        root = out / "tiny_model"
        built = build_tiny_llava(root, seed=0, vocab_extra=demo_data.PHRASES) if not (root / "lm").is_dir() else \
            {"lm": root / "lm", "vision": root / "vision"}
        paths, size = {"lm": str(built["lm"]), "vision": str(built["vision"])}, IMAGE_SIZE
    else:
        from basic_plugin.lab.assets import install_assets

        assets = install_assets(args.cache_dir, progress=progress)
        paths, size = {"lm": assets["llm"], "vision": assets["vision_112"]}, 112
    layers = json.loads((Path(paths["lm"]) / "config.json").read_text())["num_hidden_layers"]
    fmnist_dir = args.fmnist_dir or demo_data.FMNIST_DIR
    if not demo_data.fmnist_available(fmnist_dir):
        print(f"error: --fmnist-dir {fmnist_dir}: Fashion-MNIST not found; allowed: {demo_data.INSTALL_HINT}",
              file=sys.stderr)
        return 2
    data = demo_data.build_dataset(out / "data", train=cfg["steps"] * cfg["batch"], test=cfg["test"], val=cfg["val"],
                                   size=size, seed=0, fmnist_dir=fmnist_dir, progress=progress)
    captions = demo_data.class_captions()
    version, cpu = code_version(), machine()

    def run_dir(name, seed):
        return out / name / f"seed{seed}"

    def train(name, seed):
        """Train one run unless an identical finished one is there (resumable)."""
        d = run_dir(name, seed)
        targs = train_args(paths, data, d, arm="basic", steps=cfg["steps"], batch=cfg["batch"], seed=seed, lr=1e-3,
                           deepspeed=True, basic_flags=config_flags(name, layers))  # as the demo trains
        stamp = d / "sweep_args.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == targs and (d / "mm_projector.bin").is_file():
            return
        result = run_training(targs, d, cfg["steps"], deepspeed=True, desc=f"{name} s{seed}", progress=progress,
                              threads=1)
        (d / "sweep_result.json").write_text(json.dumps({**result, "code": version, "machine": cpu}))
        stamp.write_text(json.dumps(targs))

    def evaluate(name, seed, split):
        d = run_dir(name, seed)
        path = d / f"eval_{split}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = evaluate_model(d, paths["lm"], data, captions=captions, n_test=cfg[split], n_lens=0,
                                n_caption_test=0, progress=False, split=split)
        path.write_text(json.dumps(result))
        return result

    jobs = [(name, seed) for seed in range(cfg["seeds"]) for name in names]
    start = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two trainings at a time, one thread each
        list(pool.map(lambda job: train(*job), jobs))
    import torch

    torch.set_num_threads(2)
    val = {name: summarise([evaluate(name, seed, "val") for seed in range(cfg["seeds"])]) for name in names}
    chosen = select(val)
    logs = {name: [json.loads((run_dir(name, seed) / "sweep_result.json").read_text())["log_history"]
                   for seed in range(cfg["seeds"])] for name in names}
    health = {name: [health_summary(h) for h in histories] for name, histories in logs.items()}
    report = {"config": cfg, "code": version, "machine": cpu, "selection_metric": SELECTION_METRIC, "chosen": chosen,
              "flags": {n: config_flags(n, layers) for n in names}, "validation": val, "health": health}
    if REFERENCE in val and chosen != REFERENCE:
        report["chosen_beats_reference_on_val"] = val[chosen][SELECTION_METRIC] > val[REFERENCE][SELECTION_METRIC]
    if args.final_test:
        from basic_plugin.lab.demo.evaluate import compare_paired

        test = {}
        for name in names:
            evals = [evaluate(name, seed, "test") for seed in range(cfg["seeds"])]
            test[name] = summarise(evals)
            test[name]["correct"] = [x for e in evals for x in e["calibrated_correct"]]
        reference = REFERENCE if REFERENCE in test else names[0]
        for name in names:
            test[name]["vs_reference"] = compare_paired(test[reference]["correct"], test[name]["correct"])
        for name in names:
            del test[name]["correct"]
        report["test"], report["reference"] = test, reference
    report["wall_s"] = time.perf_counter() - start
    (out / "sweep.json").write_text(json.dumps(report, indent=1))
    (out / "sweep.md").write_text(markdown(report))
    plot(report, out / "sweep.png")
    plot_curves(logs, out / "curves.png")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"Chosen on validation ({report['selection_metric']}, mean of {report['config']['seeds']} seeds): "
             f"**{report['chosen']}**", "", "| config | flags | val calibrated | val raw | val caption loss |",
             "|---|---|---:|---:|---:|"]
    for name, v in report["validation"].items():
        lines.append(f"| {name} | `{' '.join(report['flags'][name]) or '(paper defaults)'}` | "
                     f"{100 * v['calibrated_accuracy']:.1f}% | {100 * v['accuracy']:.1f}% | {v['caption_loss']:.3f} |")
    if "chosen_beats_reference_on_val" in report:
        lines += ["", f"On validation the chosen setting {'beats' if report['chosen_beats_reference_on_val'] else 'does not beat'} "
                      f"the reference arm `{REFERENCE}` (the baseline's training with BASIC's curves logged)."]
    if report.get("health"):
        lines += ["", "Health at the last 5 logging steps (mean over seeds; max: the largest 5-step mean, the guard's "
                      "window):", "", "| config | lm loss | weighted cos(v, vhat) | pairwise cos v (max) | "
                      "pairwise cos vhat | norm v | norm vhat | BASIC's share (max) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, runs in report["health"].items():
            def m(key):
                vals = [r[key] for r in runs if key in r]
                return statistics.fmean(vals) if vals else float("nan")
            lines.append(f"| {name} | {m('lm_loss'):.3f} | {m('basic_weighted_cos'):.3f} | {m('basic_v_pairwise_cos'):.3f} "
                         f"({m('basic_v_pairwise_cos_max_window'):.3f}) | {m('basic_vhat_pairwise_cos'):.3f} | "
                         f"{m('basic_v_norm'):.1f} | {m('basic_vhat_norm'):.0f} | {m('basic_share'):.3f} "
                         f"({m('basic_share_max_window'):.3f}) |")
    if "test" in report:
        lines += ["", f"Test split, used once for every configuration (difference vs `{report['reference']}`, "
                      "95% paired bootstrap; McNemar p):", "",
                  "| config | test calibrated [95% CI] | diff vs reference | p | test raw | caption loss |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, t in report["test"].items():
            c = t["vs_reference"]
            lines.append(f"| {name}{' (chosen)' if name == report['chosen'] else ''} | {100 * c['acc_b']:.1f}% "
                         f"[{100 * c['ci_b'][0]:.1f}, {100 * c['ci_b'][1]:.1f}] | {100 * c['diff']:+.1f} "
                         f"[{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}] | {c['mcnemar_p']:.3g} | "
                         f"{100 * t['accuracy']:.1f}% | {t['caption_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["validation"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, name in enumerate(names):
        per_seed = report["validation"][name]["per_seed_calibrated"]
        ax.scatter([i] * len(per_seed), [100 * x for x in per_seed], color="0.6", s=12)
        ax.scatter([i], [100 * report["validation"][name]["calibrated_accuracy"]], color="C0", s=40)
        if "test" in report:
            ax.scatter([i + 0.15], [100 * report["test"][name]["calibrated_accuracy"]], color="C3", marker="x", s=40)
    ax.axhline(10, color="0.8", lw=1, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("calibrated zero-shot accuracy (%)")
    ax.set_title("validation (blue: mean, grey: seeds)" + ("; test (red x)" if "test" in report else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CURVES = (("lm_loss", "caption (lm) loss"), ("basic_weighted_cos", "a_i-weighted cos(v, vhat)"),
          ("basic_v_pairwise_cos", "pairwise cosine of an image's v tokens"), ("basic_v_norm", "mean norm of v"),
          ("basic_share", "BASIC's share of the loss"))


def plot_curves(logs: Dict[str, List[List[dict]]], path: Path) -> None:
    """Per-step health curves, one line per configuration (mean over seeds, 5-step running mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.3), dpi=90)
    for i, (name, histories) in enumerate(logs.items()):
        for ax, (key, title) in zip(axes, CURVES):
            series = [step_curves(h, key) for h in histories]
            series = [s for s in series if s[0]]
            if not series:
                continue
            n = min(len(s[0]) for s in series)
            xs = series[0][0][:n]
            ys = [statistics.fmean(s[1][j] for s in series) for j in range(n)]
            smooth = [statistics.fmean(ys[max(0, j - 4):j + 1]) for j in range(n)]
            ax.plot(xs, smooth, color="black" if name == REFERENCE else f"C{i % 10}",
                    linewidth=2.2 if name == REFERENCE else 1.3, label=name)
            ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
