"""``basic-llava sweep``: BASIC's settings on the demo's mini-LLaVA, chosen on a validation split.

Every configuration trains the demo's model with the same seeds, data and steps, and is compared
with the same reference arm (``monitor``: BASIC on with both lambdas 0, which trains bit for bit
like the baseline and logs BASIC's curves). The default grid:

==============  ==========================================================  ===============================
name            flags (after ``--basic True``)                              question
==============  ==========================================================  ===============================
monitor         ``--basic_lambda_das 0 --basic_lambda_sds 0``               the baseline, with BASIC's curves
paper           (none: the paper's defaults)                                the paper's weights
das_only        ``--basic_lambda_sds 0``                                    the direction term alone
drop            ``--basic_drop_channels auto``                              the target without the LLM's
                                                                            massive-activation channels
std             ``--basic_standardize_target True``                         the target standardised per
                                                                            channel
drop_das        ``--basic_drop_channels auto --basic_lambda_sds 0``         ... with the direction term alone
std_das         ``--basic_standardize_target True --basic_lambda_sds 0``    ... with the direction term alone
==============  ==========================================================  ===============================

``--configs`` also takes the earlier grid's one-factor settings: ``sds_only`` (lambda_das 0),
``das_0.3``, ``das_0.1``, ``uniform`` (``--basic_patch_weights uniform``), ``depth_L4``
(``--basic_depth`` L/4).

The yardstick is fixed before any BASIC comparison: the training length comes from the monitor
arm alone (``basic-llava length``, :mod:`basic_plugin.lab.length`, which writes
``<out>/length.json``; ``--steps`` overrides it), every run trains on the same 3,200 captions
(``--train-images``; a run of N steps sees the first N x 8 of them in its seed's order), and
selection uses a **validation split** (Fashion-MNIST training images that are never trained on)
with one metric fixed in advance: the calibrated (PMI) zero-shot accuracy, mean over seeds.
``--final-test`` then evaluates **every** configuration once on the test split. Comparisons
respect seeds: per seed, pooled over seeds (paired by image within seed), and how many seeds go
each way (:func:`basic_plugin.lab.demo.evaluate.compare_seeds`).

Every run and evaluation is kept and reused (resumable), two runs at a time with one thread
each, each run evaluated on validation as soon as it is trained. Runs live in
``<out>/steps<N>/<config>/seed<s>`` and save the projector every ``--save-every`` steps (which
changes nothing in the run). Outputs under ``--out``: ``sweep.json``, ``sweep.md`` (tables, with
each configuration's health metrics at the end of training: what the guard's thresholds are set
from), ``sweep.png`` (accuracies per seed) and ``curves.png`` (health per step).
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from basic_plugin.host.refusal import print_refusal
from basic_plugin.host.usage import CommandParser
from basic_plugin.lab.demo.run import DEFAULTS as DEMO

MONITOR_FLAGS = ["--basic_lambda_das", "0", "--basic_lambda_sds", "0"]
CONFIGS: Dict[str, List[str]] = {
    "monitor": MONITOR_FLAGS,
    "paper": [],
    "das_only": ["--basic_lambda_sds", "0"],
    "drop": ["--basic_drop_channels", "auto"],
    "drop_das": ["--basic_drop_channels", "auto", "--basic_lambda_sds", "0"],
    "std": ["--basic_standardize_target", "True"],
    "std_das": ["--basic_standardize_target", "True", "--basic_lambda_sds", "0"],
    # the earlier one-factor grid (docs/RESULTS.md): runnable with --configs, not in the default grid
    "sds_only": ["--basic_lambda_das", "0"],
    "das_0.3": ["--basic_lambda_das", "0.3"],
    "das_0.1": ["--basic_lambda_das", "0.1"],
    "uniform": ["--basic_patch_weights", "uniform"],
    "depth_L4": ["--basic_depth", "{L4}"],
}
#: the default grid, in priority order (runs are trained in this order, so a cut budget loses the last ones)
GRID = ("monitor", "paper", "das_only", "drop", "std", "drop_das", "std_das")
SELECTION_METRIC = "calibrated_accuracy"
REFERENCE = "monitor"  # BASIC on, both lambdas 0: trains bit for bit like the baseline
#: the demo's yardstick (batch, data sizes, checkpoints), with four seeds
DEFAULTS = {**{k: DEMO[k] for k in ("batch", "val", "test", "train_images", "save_every")}, "seeds": 4}
TINY = {"steps": 2, "batch": 2, "seeds": 2, "val": 10, "test": 10, "train_images": 8, "save_every": 1}


def config_flags(name: str, layers: int) -> List[str]:
    return [f.replace("{L4}", str(max(1, layers // 4))) for f in CONFIGS[name]]


# -- the runs -----------------------------------------------------------------------------------
@dataclass
class Workspace:
    """What every run of a grid shares: its folder, settings, model parts and data."""

    out: Path
    cfg: dict
    paths: Dict[str, str]
    data: Dict[str, str]
    layers: int
    progress: bool

    def run_dir(self, steps: int, name: str, seed: int) -> Path:
        return self.out / f"steps{steps}" / name / f"seed{seed}"


def add_workspace_options(p: argparse.ArgumentParser) -> None:
    """The options :func:`workspace` reads (shared by ``sweep`` and ``length``)."""
    p.add_argument("--out", default="runs/grid", help="the grid's folder (default runs/grid)")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds 0..N-1 (default {DEFAULTS['seeds']})")
    p.add_argument("--val", type=int, default=None, help=f"validation images (default {DEFAULTS['val']})")
    p.add_argument("--test", type=int, default=None, help=f"test images (default {DEFAULTS['test']})")
    p.add_argument("--train-images", type=int, default=None,
                   help=f"training captions shared by every run (default {DEFAULTS['train_images']})")
    p.add_argument("--save-every", type=int, default=None,
                   help=f"save the projector every N steps (default {DEFAULTS['save_every']})")
    p.add_argument("--fmnist-dir", default=None, help="Fashion-MNIST idx folder (default: the Debian package's)")
    p.add_argument("--cache-dir", default=None, help="assets cache (default ~/.cache/basic-llava/assets)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (tests only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def workspace(args) -> Workspace:
    """Assets, data and settings for a grid under ``args.out``; raises SystemExit(2) with one line when
    Fashion-MNIST is missing."""
    from basic_plugin.lab.demo import data as demo_data

    cfg = dict(TINY if args.tiny else DEFAULTS)
    for key in ("seeds", "val", "test", "train_images", "save_every"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
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
        raise SystemExit(print_refusal(f"--fmnist-dir {fmnist_dir}: Fashion-MNIST not found; "
                                f"allowed: {demo_data.INSTALL_HINT}"))
    data = demo_data.build_dataset(out / "data", train=cfg["train_images"], test=cfg["test"], val=cfg["val"],
                                   size=size, seed=0, fmnist_dir=fmnist_dir, progress=progress)
    return Workspace(out, cfg, paths, data, layers, progress)


def train_run(ws: Workspace, name: str, seed: int, steps: int, flags: Sequence[str]) -> Path:
    """Train one run unless an identical finished one is there (resumable); its folder."""
    from basic_plugin.lab.demo.run import run_training, train_args
    from basic_plugin.lab.provenance import code_version, machine

    d = ws.run_dir(steps, name, seed)
    targs = train_args(ws.paths, ws.data, d, arm="basic", steps=steps, batch=ws.cfg["batch"], seed=seed, lr=1e-3,
                       deepspeed=True, basic_flags=flags, save_every=ws.cfg["save_every"])  # as the demo trains
    stamp = d / "sweep_args.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == targs and (d / "mm_projector.bin").is_file():
        return d
    result = run_training(targs, d, steps, deepspeed=True, desc=f"{name} s{seed} ({steps} steps)",
                          progress=ws.progress, threads=1)
    (d / "sweep_result.json").write_text(json.dumps({**result, "code": code_version(), "machine": machine()}))
    stamp.write_text(json.dumps(targs))
    return d


_eval_lock = threading.Lock()


def evaluate_run(ws: Workspace, model_dir: Path, split: str) -> dict:
    """Zero-shot evaluation of a trained projector (a run or one of its checkpoints) on ``split``,
    kept in ``<model_dir>/eval_<split>.json`` and reused."""
    import shutil

    from basic_plugin.lab.demo import data as demo_data
    from basic_plugin.lab.demo.evaluate import evaluate_model

    path = model_dir / f"eval_{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not (model_dir / "config.json").is_file():  # an adapter checkpoint: the run's config
        shutil.copy(model_dir.parent / "config.json", model_dir / "config.json")
    with _eval_lock:  # model loading patches process-wide state: one at a time, scoring in parallel
        from basic_plugin.lab.towers import apply_lab_host

        apply_lab_host()
    result = evaluate_model(model_dir, ws.paths["lm"], ws.data, captions=demo_data.class_captions(),
                            n_test=ws.cfg[split], n_lens=0, n_caption_test=0, progress=False, split=split)
    path.write_text(json.dumps(result))
    return result


def in_pairs(jobs: Sequence, work: Callable) -> list:
    """``work(job)`` for every job, two at a time (one training process or one evaluation thread
    each, with one thread for torch in this process): the two cores stay busy."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    torch.set_num_threads(1)
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(work, jobs))


def checkpoints(run_dir: Path) -> Dict[int, Path]:
    """``{step: folder}`` of a run's saved projectors (LLaVA's adapter checkpoints ``checkpoint-<step>``)."""
    return {int(p.name.split("-")[1]): p for p in run_dir.glob("checkpoint-*") if (p / "mm_projector.bin").is_file()}


# -- summaries ----------------------------------------------------------------------------------
def summarise(evals: Sequence[dict]) -> dict:
    """Mean over seeds of the raw and calibrated accuracies and the held-out caption loss, with the per-seed values."""
    def mean(key):
        return statistics.fmean(e[key] for e in evals)

    return {"seeds": len(evals), "accuracy": mean("accuracy"), "calibrated_accuracy": mean("calibrated_accuracy"),
            "caption_loss": statistics.fmean(statistics.fmean(e["true_nll"]) for e in evals),
            "per_seed_calibrated": [e["calibrated_accuracy"] for e in evals],
            "per_seed_raw": [e["accuracy"] for e in evals],
            "per_seed_caption_loss": [statistics.fmean(e["true_nll"]) for e in evals]}


def compare(reference: Sequence[dict], other: Sequence[dict]) -> dict:
    """``other`` vs ``reference`` (evaluations per seed, same images) on the calibrated accuracy, the raw
    accuracy and the caption loss (lower is better), each respecting seeds."""
    from basic_plugin.lab.demo.evaluate import compare_seeds

    return {"calibrated": compare_seeds([e["calibrated_correct"] for e in reference],
                                        [e["calibrated_correct"] for e in other]),
            "raw": compare_seeds([e["correct"] for e in reference], [e["correct"] for e in other]),
            "caption_loss": compare_seeds([e["true_nll"] for e in reference], [e["true_nll"] for e in other])}


def select(val: Dict[str, dict]) -> str:
    """The BASIC configuration with the best mean calibrated validation accuracy (ties: the earlier
    listed). The reference arm is not a candidate (it is the baseline, not a BASIC setting) unless it
    is the only configuration; whether the choice beats it is reported next to the choice."""
    order = list(CONFIGS)
    candidates = [n for n in val if n != REFERENCE] or list(val)
    return max(sorted(candidates, key=order.index), key=lambda name: val[name][SELECTION_METRIC])


def beats(c: dict) -> bool:
    """The bar for saying a setting beats the baseline on test: the pooled interval above 0 and at least
    3 of 4 seeds (three quarters of them) ahead."""
    return c["diff_ci"][0] > 0 and c["seeds_ahead"] >= 0.75 * c["seeds"]


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


# -- the command --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser("sweep", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_workspace_options(p)
    p.add_argument("--configs", default=",".join(GRID),
                   help=f"comma-separated configurations (default {','.join(GRID)}; all: {','.join(CONFIGS)})")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every run (default: the length chosen by `basic-llava length` in --out)")
    p.add_argument("--final-test", "--test-once", dest="final_test", action="store_true",
                   help="after validation, evaluate every configuration once on the test split")
    return p


def chosen_length(out: Path) -> Optional[int]:
    path = out / "length.json"
    return json.loads(path.read_text())["chosen_steps"] if path.is_file() else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basic_plugin.lab.argv import strip_separator
    from basic_plugin.lab.provenance import code_version, machine

    args = build_parser().parse_args(strip_separator(argv))
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        return print_refusal(f"--configs: unknown {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}")
    steps = args.steps or chosen_length(Path(args.out)) or (TINY["steps"] if args.tiny else None)
    if not steps:
        return print_refusal(f"--steps: no training length given and no {Path(args.out) / 'length.json'}; allowed: an "
                      "integer >= 1, or run `basic-llava length` with the same --out first")
    ws = workspace(args)
    seeds = range(ws.cfg["seeds"])
    start = time.perf_counter()
    flags = {n: config_flags(n, ws.layers) for n in names}

    def train_and_validate(job):
        name, seed = job
        return evaluate_run(ws, train_run(ws, name, seed, steps, flags[name]), "val")

    jobs = [(name, seed) for name in names for seed in seeds]  # configuration by configuration, every seed
    val_evals = dict(zip(jobs, in_pairs(jobs, train_and_validate)))
    val = {n: summarise([val_evals[(n, s)] for s in seeds]) for n in names}
    chosen = select(val)
    logs = {n: [json.loads((ws.run_dir(steps, n, s) / "sweep_result.json").read_text())["log_history"] for s in seeds]
            for n in names}
    health = {n: [health_summary(h) for h in histories] for n, histories in logs.items()}
    report = {"config": {**ws.cfg, "steps": steps}, "code": code_version(), "machine": machine(),
              "selection_metric": SELECTION_METRIC, "chosen": chosen, "flags": flags, "validation": val,
              "health": health}
    if REFERENCE in val:
        report["validation_vs_reference"] = {n: compare([val_evals[(REFERENCE, s)] for s in seeds],
                                                        [val_evals[(n, s)] for s in seeds]) for n in names}
        if chosen != REFERENCE:
            report["chosen_beats_reference_on_val"] = val[chosen][SELECTION_METRIC] > val[REFERENCE][SELECTION_METRIC]
    if args.final_test:
        test_evals = dict(zip(jobs, in_pairs(jobs, lambda job: evaluate_run(ws, ws.run_dir(steps, *job), "test"))))
        report["test"] = {n: summarise([test_evals[(n, s)] for s in seeds]) for n in names}
        reference = REFERENCE if REFERENCE in names else names[0]
        report["reference"] = reference
        report["test_vs_reference"] = {n: compare([test_evals[(reference, s)] for s in seeds],
                                                  [test_evals[(n, s)] for s in seeds]) for n in names}
        report["beats_reference_on_test"] = [n for n in names if n != reference
                                             and beats(report["test_vs_reference"][n]["calibrated"])]
    report["wall_s"] = time.perf_counter() - start
    (ws.out / "sweep.json").write_text(json.dumps(report, indent=1))
    (ws.out / "sweep.md").write_text(markdown(report))
    plot(report, ws.out / "sweep.png")
    plot_curves(logs, ws.out / "curves.png")
    print(markdown(report))
    return 0


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _seeds(values: Sequence[float]) -> str:
    return " / ".join(_pct(v) for v in values)


def _diff(c: dict, scale: float = 100, digits: int = 1) -> str:
    lo, hi = c["diff_ci"]
    return f"{scale * c['diff']:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def _ways(c: dict) -> str:
    return f"{c['seeds_ahead']} up / {c['seeds_behind']} down" + (f" / {c['seeds_tied']} tied" if c["seeds_tied"] else "")


def comparison_table(summary: Dict[str, dict], versus: Optional[Dict[str, dict]], reference: str,
                     chosen: Optional[str] = None) -> List[str]:
    """One row per configuration: calibrated (pooled, per seed, vs reference with seeds each way), raw, caption loss."""
    lines = ["| config | calibrated, mean of seeds | per seed | vs reference [95% CI] | seeds | raw (per seed) | "
             "raw vs reference | caption loss | vs reference |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in summary.items():
        c = versus.get(name) if versus else None
        label = name + (" (chosen)" if name == chosen else "")
        if c is None or name == reference:
            lines.append(f"| {label} | {_pct(v['calibrated_accuracy'])}% | {_seeds(v['per_seed_calibrated'])} | | | "
                         f"{_pct(v['accuracy'])}% ({_seeds(v['per_seed_raw'])}) | | {v['caption_loss']:.3f} | |")
            continue
        lines.append(f"| {label} | {_pct(v['calibrated_accuracy'])}% | {_seeds(v['per_seed_calibrated'])} | "
                     f"{_diff(c['calibrated'])} | {_ways(c['calibrated'])} | {_pct(v['accuracy'])}% "
                     f"({_seeds(v['per_seed_raw'])}) | {_diff(c['raw'])} | {v['caption_loss']:.3f} | "
                     f"{_diff(c['caption_loss'], 1, 3)} |")
    return lines


def markdown(report: dict) -> str:
    seeds, steps = report["config"]["seeds"], report["config"]["steps"]
    lines = [f"{steps} steps, {seeds} seeds. Chosen on validation ({report['selection_metric']}, mean of seeds): "
             f"**{report['chosen']}** (`{' '.join(report['flags'][report['chosen']]) or '(paper defaults)'}`)", "",
             "Flags: " + "; ".join(f"{n} `{' '.join(f) or '(paper defaults)'}`" for n, f in report["flags"].items()), "",
             "Validation (differences: pooled over seeds, paired by image within seed, 95% interval from resampling "
             "images; seeds: how many go each way):", ""]
    lines += comparison_table(report["validation"], report.get("validation_vs_reference"), REFERENCE, report["chosen"])
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
        lines += ["", f"Test split, used once for every configuration (vs `{report['reference']}`):", ""]
        lines += comparison_table(report["test"], report["test_vs_reference"], report["reference"], report["chosen"])
        won = report["beats_reference_on_test"]
        lines += ["", ("Beats the reference on test (pooled calibrated interval above 0 and at least 3 of 4 seeds "
                       f"ahead): {', '.join(won)}." if won else "No configuration beats the reference on test (the bar: "
                       "pooled calibrated interval above 0 and at least 3 of 4 seeds ahead).")]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from basic_plugin.lab.plots import save, subplots

    names = list(report["validation"])
    fig, ax = subplots(figsize=(max(6, 1.2 * len(names) + 2), 3.8))
    for i, name in enumerate(names):
        per_seed = report["validation"][name]["per_seed_calibrated"]
        ax.scatter([i - 0.12] * len(per_seed), [100 * x for x in per_seed], color="C0", alpha=0.45, s=14)
        ax.scatter([i - 0.12], [100 * report["validation"][name]["calibrated_accuracy"]], color="C0", s=50,
                   marker="_", linewidths=2.5, label="validation" if i == 0 else None)
        if "test" in report:
            per_seed = report["test"][name]["per_seed_calibrated"]
            ax.scatter([i + 0.12] * len(per_seed), [100 * x for x in per_seed], color="C3", alpha=0.45, s=14)
            ax.scatter([i + 0.12], [100 * report["test"][name]["calibrated_accuracy"]], color="C3", s=50,
                       marker="_", linewidths=2.5, label="test" if i == 0 else None)
    ax.axhline(10, color="0.8", lw=1, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("calibrated zero-shot accuracy (%)")
    ax.set_title(f"{report['config']['steps']} steps: dots = seeds, bars = mean of seeds (chance 10%)", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, path, dpi=110)


CURVES = (("lm_loss", "caption (lm) loss"), ("basic_weighted_cos", "a_i-weighted cos(v, vhat)"),
          ("basic_v_pairwise_cos", "pairwise cosine of an image's v tokens"), ("basic_v_norm", "mean norm of v"),
          ("basic_share", "BASIC's share of the loss"))


def plot_curves(logs: Dict[str, List[List[dict]]], path: Path) -> None:
    """Per-step health curves, one line per configuration (mean over seeds, 5-step running mean)."""
    from basic_plugin.lab.plots import save, subplots

    fig, axes = subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.3), dpi=90)
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
    save(fig, path)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
