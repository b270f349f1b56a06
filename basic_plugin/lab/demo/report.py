"""The demo's report: terminal table, ``report.md`` + ``report.html``, ``losses.png``, ``lens.png``, ``summary.json``."""
from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from basic_plugin.lab.demo.evaluate import compare_paired, mcnemar_sample_size, paired_bootstrap
from basic_plugin.basic.target import default_depth

LABELS = {"baseline": "baseline", "basic": "BASIC"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _series(history: List[dict], key: str):
    pts = [(e["step"], e[key]) for e in history if key in e and "step" in e and "train_runtime" not in e]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(ys: Sequence[float], k: int = 5) -> List[float]:
    out = []
    for i in range(len(ys)):
        window = ys[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


HEALTH = (("basic_v_pairwise_cos", "basic_vhat_pairwise_cos", "pairwise cosine of an image's tokens\n(solid: projector v, dashed: target vhat)"),
          ("basic_weighted_cos", None, "a_i-weighted cos(v, vhat)"),
          ("basic_v_norm", "basic_vhat_norm", "mean token norm (solid: v, dashed: vhat)"),
          ("basic_share", None, "BASIC's share of the loss"))


def plot_health(runs: Dict[str, Dict[str, dict]], path: Path) -> Optional[Path]:
    """BASIC's health metrics per step for both arms (the baseline logs them as a monitor-only run)."""
    if not any(_series(run["log_history"], "basic_v_pairwise_cos")[0] for arms in runs.values() for run in arms.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), dpi=90)
    colors = {"baseline": "tab:blue", "basic": "tab:orange"}
    for seed, arms in runs.items():
        for arm, run in arms.items():
            label = f"{LABELS[arm]}" + (f" s{seed}" if len(runs) > 1 else "")
            for ax, (key, dashed, title) in zip(axes, HEALTH):
                xs, ys = _series(run["log_history"], key)
                if xs:
                    ax.plot(xs, _smooth(ys), color=colors[arm], linewidth=1.6, label=label)
                if dashed:
                    xs2, ys2 = _series(run["log_history"], dashed)
                    if xs2:
                        ax.plot(xs2, _smooth(ys2), color=colors[arm], linewidth=1.2, linestyle="--")
                ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(runs: Dict[str, Dict[str, dict]], path: Path) -> Path:
    """lm loss of both arms (thin: raw, thick: 5-step mean), and BASIC's two terms (as added to the loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=90)
    colors = {"baseline": "tab:blue", "basic": "tab:orange"}
    for seed, arms in runs.items():
        for arm, run in arms.items():
            xs, ys = _series(run["log_history"], "lm_loss")
            if not xs:
                xs, ys = _series(run["log_history"], "loss")
            label = f"{LABELS[arm]}" + (f" s{seed}" if len(runs) > 1 else "")
            axes[0].plot(xs, ys, color=colors[arm], alpha=0.25, linewidth=0.8)
            axes[0].plot(xs, _smooth(ys), color=colors[arm], linewidth=1.8, label=label)
            for ax, key in ((axes[1], "basic_das"), (axes[2], "basic_sds")):
                xs2, ys2 = _series(run["log_history"], key)
                if xs2:
                    ax.plot(xs2, ys2, color=colors[arm], alpha=0.35, linewidth=0.8)
                    ax.plot(xs2, _smooth(ys2), color=colors[arm], linewidth=1.8, label=label)
    axes[0].set_title("caption (lm) loss")
    axes[1].set_title("BASIC direction term (lambda * L_das)")
    axes[2].set_title("BASIC distribution term (lambda * L_sds)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean_lists(lists: List[List[float]]) -> List[float]:
    return [statistics.fmean(vals) for vals in zip(*lists)]


def aggregate(runs: Dict[str, Dict[str, dict]]) -> dict:
    """Per-seed and pooled comparisons, seed-averaged lens curves, final losses, step times."""
    per_seed = {}
    pooled_a: List[bool] = []
    pooled_b: List[bool] = []
    for seed, arms in runs.items():
        a, b = arms["baseline"]["eval"]["correct"], arms["basic"]["eval"]["correct"]
        per_seed[seed] = compare_paired(a, b, seed=int(seed))
        pooled_a += a
        pooled_b += b
    pooled = compare_paired(pooled_a, pooled_b) if len(runs) > 1 else next(iter(per_seed.values()))
    calibrated = None
    if all("calibrated_correct" in arms[arm]["eval"] for arms in runs.values() for arm in ("baseline", "basic")):
        calibrated = compare_paired([x for arms in runs.values() for x in arms["baseline"]["eval"]["calibrated_correct"]],
                                    [x for arms in runs.values() for x in arms["basic"]["eval"]["calibrated_correct"]])
    nll_a = [x for arms in runs.values() for x in arms["baseline"]["eval"].get("true_nll", [])]
    nll_b = [x for arms in runs.values() for x in arms["basic"]["eval"].get("true_nll", [])]
    nll = None
    if nll_a and len(nll_a) == len(nll_b):
        nll = {"baseline": statistics.fmean(nll_a), "basic": statistics.fmean(nll_b),
               "diff": statistics.fmean(nll_b) - statistics.fmean(nll_a), "diff_ci": paired_bootstrap(nll_a, nll_b),
               "n": len(nll_a)}
    lens = {}
    for arm in ("baseline", "basic"):
        summaries = [arms[arm]["eval"]["lens"] for arms in runs.values() if arms[arm]["eval"].get("lens")]
        if summaries:
            mean = _mean_lists([s["mean_meaningful"] for s in summaries])
            lens[arm] = {"mean_meaningful": mean, "tokens_per_image": summaries[0]["tokens_per_image"],
                         "images": summaries[0]["images"], "best_layer": max(range(len(mean)), key=mean.__getitem__),
                         "top_tokens": summaries[0]["top_tokens"]}
    final, step_s = {}, {}
    for arm in ("baseline", "basic"):
        tails, speeds = [], []
        for arms in runs.values():
            history = arms[arm]["log_history"]
            _, ys = _series(history, "lm_loss")
            if not ys:
                _, ys = _series(history, "loss")
            if ys:
                tails.append(statistics.fmean(ys[-10:]))
            end = [e for e in history if "train_runtime" in e]
            steps = max((e.get("step", 0) for e in history), default=0)
            if end and steps:
                speeds.append(end[-1]["train_runtime"] / steps)
        final[arm] = statistics.fmean(tails) if tails else float("nan")
        step_s[arm] = statistics.fmean(speeds) if speeds else float("nan")
    seed_acc = {arm: [arms[arm]["eval"]["accuracy"] for arms in runs.values()] for arm in ("baseline", "basic")}
    seed_lens0 = {arm: [arms[arm]["eval"]["lens"]["mean_meaningful"][0] for arms in runs.values()
                        if arms[arm]["eval"].get("lens")] for arm in ("baseline", "basic")}
    return {"per_seed": per_seed, "pooled": pooled, "calibrated": calibrated, "heldout_nll": nll, "lens": lens, "final_lm_loss": final, "step_s": step_s,
            "seed_accuracies": seed_acc, "seed_lens_layer0": seed_lens0}


def terminal_table(agg: dict, cfg: dict) -> str:
    p = agg["pooled"]
    seeds = len(agg["per_seed"])
    lines = []
    w = 38
    lines.append(f"{'':<{w}} {'baseline':>22} {'BASIC':>22}")
    title = f"zero-shot accuracy (n={p['n']}" + (f" = {seeds} seeds x {p['n'] // seeds}" if seeds > 1 else "") + ")"
    lines.append(f"{title:<{w}} {_pct(p['acc_a']) + ' ' + _ci(p['ci_a']):>22} {_pct(p['acc_b']) + ' ' + _ci(p['ci_b']):>22}")
    if seeds > 1:
        sa = agg["seed_accuracies"]
        lines.append(f"{'  per seed':<{w}} {' '.join(_pct(x) for x in sa['baseline']):>22} {' '.join(_pct(x) for x in sa['basic']):>22}")
    cal = agg.get("calibrated")
    if cal:
        lines.append(f"{'  calibrated (minus no-image prior)':<{w}} {_pct(cal['acc_a']) + ' ' + _ci(cal['ci_a']):>22} "
                     f"{_pct(cal['acc_b']) + ' ' + _ci(cal['ci_b']):>22}")
    nll = agg.get("heldout_nll")
    if nll:
        lines.append(f"{'held-out caption loss (nats/token)':<{w}} {nll['baseline']:>22.3f} {nll['basic']:>22.3f}")
    lens = agg["lens"]
    if lens:
        tok = lens["baseline"]["tokens_per_image"]
        b0, s0 = lens["baseline"]["mean_meaningful"][0], lens["basic"]["mean_meaningful"][0]
        lines.append(f"{f'meaningful words, layer 0 (/{tok:g})':<{w}} {b0:>22.1f} {s0:>22.1f}")
        if seeds > 1:
            sl = agg["seed_lens_layer0"]
            lines.append(f"{'  per seed':<{w}} {' '.join(f'{x:.1f}' for x in sl['baseline']):>22} "
                         f"{' '.join(f'{x:.1f}' for x in sl['basic']):>22}")
        bb, sb = lens["baseline"]["best_layer"], lens["basic"]["best_layer"]
        best_b = f"{lens['baseline']['mean_meaningful'][bb]:.1f} (layer {bb})"
        best_s = f"{lens['basic']['mean_meaningful'][sb]:.1f} (layer {sb})"
        lines.append(f"{'meaningful words, best layer':<{w}} {best_b:>22} {best_s:>22}")
    lines.append(f"{'lm loss, mean of last 10 steps':<{w}} {agg['final_lm_loss']['baseline']:>22.3f} {agg['final_lm_loss']['basic']:>22.3f}")
    lines.append(f"{'train seconds per step':<{w}} {agg['step_s']['baseline']:>22.2f} {agg['step_s']['basic']:>22.2f}")
    lines.append(f"BASIC - baseline: {100 * p['diff']:+.1f} points, 95% paired-bootstrap CI "
                 f"[{100 * p['diff_ci'][0]:+.1f}, {100 * p['diff_ci'][1]:+.1f}]; McNemar exact p = {p['mcnemar_p']:.3g} "
                 f"(only baseline right: {p['only_a']}, only BASIC right: {p['only_b']})")
    if nll:
        lines.append(f"held-out caption loss, BASIC - baseline: {nll['diff']:+.3f} nats/token, 95% paired-bootstrap CI "
                     f"[{nll['diff_ci'][0]:+.3f}, {nll['diff_ci'][1]:+.3f}] (n={nll['n']}; lower is better)")
    lines.append(power_note(p))
    return "\n".join(lines)


def power_note(p: dict) -> str:
    """How many paired test images a 2-point difference needs at the observed discordance."""
    disc = (p["only_a"] + p["only_b"]) / p["n"]
    if disc <= 0.0004:
        return "the two models disagree on no test image"
    return (f"discordant share {100 * disc:.1f}%: resolving a 2-point difference (McNemar, alpha 0.05, power 0.8) "
            f"needs about {mcnemar_sample_size(disc):,} paired test images")


def layer_table_md(lens: dict) -> str:
    if not lens:
        return "(no lens data)"
    tok = lens["baseline"]["tokens_per_image"]
    rows = [f"| layer | baseline (/{tok:g}) | BASIC (/{tok:g}) |", "|---:|---:|---:|"]
    for layer, (a, b) in enumerate(zip(lens["baseline"]["mean_meaningful"], lens["basic"]["mean_meaningful"])):
        rows.append(f"| {layer} | {a:.1f} | {b:.1f} |")
    return "\n".join(rows)


def top_tokens_md(lens: dict, layers: Sequence[int]) -> str:
    rows = ["| layer | model | most frequent nearest tokens (count) |", "|---:|---|---|"]
    for layer in layers:
        for arm in ("baseline", "basic"):
            top = lens[arm]["top_tokens"].get(layer) or lens[arm]["top_tokens"].get(str(layer)) or []
            shown = ", ".join(f"`{t!r}` ({c})" for t, c in top[:6])
            rows.append(f"| {layer} | {LABELS[arm]} | {shown} |")
    return "\n".join(rows)


def captions_md(runs: Dict[str, Dict[str, dict]]) -> str:
    first = next(iter(runs.values()))
    base, basic = first["baseline"]["eval"]["captions"], first["basic"]["eval"]["captions"]
    rows = ["| image | reference | baseline | BASIC |", "|---|---|---|---|"]
    for a, b in zip(base, basic):
        esc = lambda s: s.replace("|", "\\|") or "(empty)"  # noqa: E731
        rows.append(f"| ![]({'data/images/' + a['image']}) `{a['id']}` | {esc(a['reference'])} | {esc(a['generated'])} | "
                    f"{esc(b['generated'])} |")
    return "\n".join(rows)


def write_report(out: Path, runs: Dict[str, Dict[str, dict]], *, cfg: dict, data: dict, paths: dict,
                 timings: dict, tiny: bool = False, basic_flags: Sequence[str] = ()) -> dict:
    """Write the plots and reports under ``out``; print the terminal table; return the summary (with ``line``)."""
    from basic_plugin.lab.lens import plot_layers

    out = Path(out)
    agg = aggregate(runs)
    losses_png = plot_losses(runs, out / "losses.png")
    health_png = plot_health(runs, out / "health.png")
    lens_png = None
    if agg["lens"]:
        layers = len(agg["lens"]["basic"]["mean_meaningful"]) - 1
        depth = default_depth(layers)
        flags = list(basic_flags)
        if "--basic_depth" in flags[:-1]:
            depth = int(flags[flags.index("--basic_depth") + 1])
        lens_png = plot_layers({LABELS[a]: s for a, s in agg["lens"].items()}, out / "lens.png",
                               title="Image tokens whose nearest word is meaningful"
                                     + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""), depth=depth)
    table = terminal_table(agg, cfg)
    print(table, flush=True)
    p = agg["pooled"]
    lens = agg["lens"]
    layers = len(lens["baseline"]["mean_meaningful"]) if lens else 0
    show = sorted({0, 1, max(0, layers // 4), max(0, layers // 2), max(0, layers - 1)}) if lens else []
    model = "tiny random LLaVA (tests)" if tiny else "SmolLM2-135M-Instruct (30 layers) + DINOv2-small @112 px (64 image tokens)"
    md = [
        "# basic-llava demo: baseline vs BASIC",
        "",
        f"Model: {model}; projector `mlp2x_gelu` trained (LLaVA stage 1, `plain` template, ZeRO-2), LLM and tower frozen.",
        f"Training: {cfg['steps']} steps x batch {cfg['batch']} ({cfg['train_images']} Fashion-MNIST captions), "
        f"lr {cfg['lr']}, {cfg['seeds']} seed(s); BASIC flags: `--basic True {' '.join(basic_flags)}`.",
        "",
        "## Summary",
        "",
        "```",
        table,
        "```",
        "",
        "## Zero-shot accuracy (10-way, held-out Fashion-MNIST test images)",
        "",
        "| | n | baseline | BASIC | BASIC - baseline | McNemar p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for seed, c in agg["per_seed"].items():
        md.append(f"| seed {seed} | {c['n']} | {_pct(c['acc_a'])} {_ci(c['ci_a'])} | {_pct(c['acc_b'])} {_ci(c['ci_b'])} | "
                  f"{100 * c['diff']:+.1f} [{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}] | {c['mcnemar_p']:.3g} |")
    if len(runs) > 1:
        md.append(f"| pooled | {p['n']} | {_pct(p['acc_a'])} {_ci(p['ci_a'])} | {_pct(p['acc_b'])} {_ci(p['ci_b'])} | "
                  f"{100 * p['diff']:+.1f} [{100 * p['diff_ci'][0]:+.1f}, {100 * p['diff_ci'][1]:+.1f}] | {p['mcnemar_p']:.3g} |")
    cal = agg.get("calibrated")
    if cal:
        md.append(f"| calibrated{' (pooled)' if len(runs) > 1 else ''} | {cal['n']} | {_pct(cal['acc_a'])} "
                  f"{_ci(cal['ci_a'])} | {_pct(cal['acc_b'])} {_ci(cal['ci_b'])} | {100 * cal['diff']:+.1f} "
                  f"[{100 * cal['diff_ci'][0]:+.1f}, {100 * cal['diff_ci'][1]:+.1f}] | {cal['mcnemar_p']:.3g} |")
    md += ["", "Intervals: 95% Wilson for accuracies, 95% paired bootstrap for the difference; chance is 10%. "
           "Calibrated: each caption's log-likelihood minus its log-likelihood without the image (PMI), so "
           "a model's taste for some class names is not counted as recognising them.", ""]
    if lens:
        md += ["## Nearest vocabulary words of the image tokens, per layer", "",
               f"![lens]({Path(lens_png).name})", "",
               f"Mean count per image over {lens['baseline']['images']} held-out images (of "
               f"{lens['baseline']['tokens_per_image']:g} image tokens) whose nearest input-embedding row (cosine) is a "
               "meaningful word (alphabetic, >= 3 letters, not a stop word / special / byte piece; see "
               "`basic_plugin/lab/lens.py`). Layer 0 is the projector output; the last layer is after the final norm.", "",
               layer_table_md(lens), "", top_tokens_md(lens, show), ""]
    md += ["## Training losses", "", f"![losses]({losses_png.name})", ""]
    if health_png:
        md += ["## BASIC's health metrics", "", f"![health]({health_png.name})", "",
               "Per logging step, 5-step mean. The baseline arm runs BASIC with both lambdas at 0: it trains "
               "exactly as LLaVA does and logs the same curves. A pairwise cosine near 1 is a collapse of an "
               "image's tokens onto one direction; the share is BASIC's part of the loss.", ""]
    md += [
           "## Greedy captions (seed 0)", "", captions_md(runs), "",
           "## Timings (seconds)", "", "| phase | s |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    md += ["", f"Runs: {', '.join(run['dir'] for arms in runs.values() for run in arms.values())}", ""]
    (out / "report.md").write_text("\n".join(md))

    body = [f"<h1>basic-llava demo: baseline vs BASIC</h1><p>{html.escape(model)}</p><pre>{html.escape(table)}</pre>"]
    if lens_png:
        body.append(f'<h2>Nearest vocabulary words per layer</h2><img src="{Path(lens_png).name}">')
    body.append(f'<h2>Training losses</h2><img src="{losses_png.name}">')
    if health_png:
        body.append(f'<h2>BASIC health metrics</h2><img src="{health_png.name}">')
    first = next(iter(runs.values()))
    rows = "".join(
        f"<tr><td><img src=\"data/images/{html.escape(a['image'])}\" width=96><br>{html.escape(a['id'])}</td>"
        f"<td>{html.escape(a['reference'])}</td><td>{html.escape(a['generated'])}</td><td>{html.escape(b['generated'])}</td></tr>"
        for a, b in zip(first["baseline"]["eval"]["captions"], first["basic"]["eval"]["captions"]))
    body.append(f"<h2>Greedy captions</h2><table border=1 cellpadding=4><tr><th>image</th><th>reference</th>"
                f"<th>baseline</th><th>BASIC</th></tr>{rows}</table>")
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>basic-llava demo</title>"
                                     "<body style='font-family:sans-serif'>" + "".join(body) + "</body>")

    lens_note = ""
    if lens:
        lens_note = (f"; meaningful nearest words at the LLM input {lens['baseline']['mean_meaningful'][0]:.1f} -> "
                     f"{lens['basic']['mean_meaningful'][0]:.1f} of {lens['baseline']['tokens_per_image']:g}")
    line = (f"[demo] done in {{total}}: zero-shot accuracy baseline {_pct(p['acc_a'])} -> BASIC {_pct(p['acc_b'])} "
            f"(n={p['n']}, {100 * p['diff']:+.1f} points, McNemar p={p['mcnemar_p']:.2g}){lens_note}; "
            f"report: {out / 'report.md'}")
    summary = {"cfg": cfg, "paths": paths, "data": data, "timings": timings, "aggregate": agg,
               "runs": {s: {a: {"dir": r["dir"], "accuracy": r["eval"]["accuracy"], "wall_s": r.get("wall_s")}
                            for a, r in arms.items()} for s, arms in runs.items()},
               "line": line}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
