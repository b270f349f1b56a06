"""The demo's report: verdict, terminal table, ``report.md`` + ``report.html``, ``losses.png``, ``health.png``,
``lens.png``, ``summary.json``; every BASIC arm is compared with the baseline the same way."""
from __future__ import annotations

import html
import json
import re
import shlex
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from basic_plugin.lab.demo.evaluate import compare_paired, mcnemar_sample_size, paired_bootstrap
from basic_plugin.basic.target import default_depth

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
#: what BASIC's guard prints into train.log (basic_plugin/host/trainer.py, ``_review``)
GUARD_LINE = re.compile(r"\[basic-llava\] step (\d+): BASIC guard, (.*)")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _points(c: dict) -> str:
    return f"{100 * c['diff']:+.1f} points [{100 * c['diff_ci'][0]:+.1f}, {100 * c['diff_ci'][1]:+.1f}]"


def _series(history: List[dict], key: str):
    pts = [(e["step"], e[key]) for e in history if key in e and "step" in e and "train_runtime" not in e]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(ys: Sequence[float], k: int = 5) -> List[float]:
    out = []
    for i in range(len(ys)):
        window = ys[max(0, i - k + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def _colors(runs: Dict[str, Dict[str, dict]]) -> Dict[str, str]:
    return {arm: COLORS[i % len(COLORS)] for i, arm in enumerate(next(iter(runs.values())))}


HEALTH = (("basic_v_pairwise_cos", "basic_vhat_pairwise_cos", "pairwise cosine of an image's tokens\n(solid: projector v, dashed: target vhat)"),
          ("basic_weighted_cos", None, "a_i-weighted cos(v, vhat)"),
          ("basic_v_norm", "basic_vhat_norm", "mean token norm (solid: v, dashed: vhat)"),
          ("basic_share", None, "BASIC's share of the loss"))


def plot_health(runs: Dict[str, Dict[str, dict]], path: Path, labels: Dict[str, str]) -> Optional[Path]:
    """BASIC's health metrics per step for every arm (the baseline logs them as a monitor-only run)."""
    if not any(_series(run["log_history"], "basic_v_pairwise_cos")[0] for arms in runs.values() for run in arms.values()):
        return None
    from basic_plugin.lab.plots import save, subplots

    fig, axes = subplots(1, 4, figsize=(14, 3.2), dpi=90)
    colors = _colors(runs)
    for seed, arms in runs.items():
        for arm, run in arms.items():
            label = labels[arm] + (f" s{seed}" if len(runs) > 1 else "")
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
    return save(fig, path)


def plot_losses(runs: Dict[str, Dict[str, dict]], path: Path, labels: Dict[str, str]) -> Path:
    """lm loss of every arm (thin: raw, thick: 5-step mean), and BASIC's two terms (as added to the loss)."""
    from basic_plugin.lab.plots import save, subplots

    fig, axes = subplots(1, 3, figsize=(11, 3.2), dpi=90)
    colors = _colors(runs)
    for seed, arms in runs.items():
        for arm, run in arms.items():
            xs, ys = _series(run["log_history"], "lm_loss")
            if not xs:
                xs, ys = _series(run["log_history"], "loss")
            label = labels[arm] + (f" s{seed}" if len(runs) > 1 else "")
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
    return save(fig, path)


def _mean_lists(lists: List[List[float]]) -> List[float]:
    return [statistics.fmean(vals) for vals in zip(*lists)]


def _pair(runs: Dict[str, Dict[str, dict]], arm: str) -> dict:
    """``arm`` against the baseline on the same images: raw accuracy per seed and pooled, calibrated
    accuracy and held-out caption loss pooled."""
    def pooled(a_arm: str, key: str) -> list:
        return [x for arms in runs.values() for x in arms[a_arm]["eval"][key]]

    per_seed = {seed: compare_paired(arms["baseline"]["eval"]["correct"], arms[arm]["eval"]["correct"], seed=int(seed))
                for seed, arms in runs.items()}
    raw = compare_paired(pooled("baseline", "correct"), pooled(arm, "correct")) if len(runs) > 1 \
        else next(iter(per_seed.values()))
    calibrated = compare_paired(pooled("baseline", "calibrated_correct"), pooled(arm, "calibrated_correct"))
    nll_a, nll_b = pooled("baseline", "true_nll"), pooled(arm, "true_nll")
    nll = {"baseline": statistics.fmean(nll_a), arm: statistics.fmean(nll_b),
           "diff": statistics.fmean(nll_b) - statistics.fmean(nll_a), "diff_ci": paired_bootstrap(nll_a, nll_b),
           "n": len(nll_a)}
    return {"per_seed": per_seed, "pooled": raw, "calibrated": calibrated, "heldout_nll": nll}


def aggregate(runs: Dict[str, Dict[str, dict]]) -> dict:
    """Per arm: seed-averaged lens curves, final losses, step times, per-seed accuracies; every BASIC arm against
    the baseline under ``vs_baseline[arm]`` (the same keys, for that pair), and the ``basic`` arm's comparison at
    the top level too, as readers of the two-arm demo expect it."""
    names = list(next(iter(runs.values())))
    lens, final, step_s = {}, {}, {}
    for arm in names:
        summaries = [arms[arm]["eval"]["lens"] for arms in runs.values() if arms[arm]["eval"].get("lens")]
        if summaries:
            mean = _mean_lists([s["mean_meaningful"] for s in summaries])
            lens[arm] = {"mean_meaningful": mean, "tokens_per_image": summaries[0]["tokens_per_image"],
                         "images": summaries[0]["images"], "best_layer": max(range(len(mean)), key=mean.__getitem__),
                         "top_tokens": summaries[0]["top_tokens"]}
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
    per_arm = {"lens": lens, "final_lm_loss": final, "step_s": step_s,
               "seed_accuracies": {arm: [arms[arm]["eval"]["accuracy"] for arms in runs.values()] for arm in names},
               "seed_lens_layer0": {arm: [arms[arm]["eval"]["lens"]["mean_meaningful"][0] for arms in runs.values()
                                          if arms[arm]["eval"].get("lens")] for arm in names}}
    vs = {arm: {**_pair(runs, arm), **{key: {a: v for a, v in values.items() if a in ("baseline", arm)}
                                       for key, values in per_arm.items()}}
          for arm in names if arm != "baseline"}
    return {**vs["basic"], **per_arm, "vs_baseline": vs}


def guard_verdict(run_dir) -> dict:
    """What BASIC's guard said in a run: its lines in ``train.log`` and the ``plugin_guard_warnings`` of the
    log entries in ``trainer_state.json`` (either may be missing: a run stopped early, a log cut short).

    Returns ``{"warnings", "first_step", "first_message", "text"}``; ``text`` is "silent" or
    "warned N times (first at step S: message)".
    """
    run_dir = Path(run_dir)
    lines = []
    if (run_dir / "train.log").is_file():
        for line in (run_dir / "train.log").read_text(encoding="utf-8", errors="replace").splitlines():
            match = GUARD_LINE.search(line)
            if match:
                lines.append((int(match.group(1)), match.group(2).strip()))
    logged = []
    if (run_dir / "trainer_state.json").is_file():
        logged = [e for e in json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
                  if e.get("plugin_guard_warnings")]
    count = max(len(lines), sum(int(e["plugin_guard_warnings"]) for e in logged))
    if not count:
        return {"warnings": 0, "first_step": None, "first_message": None, "text": "silent"}
    step = min([s for s, _ in lines] + [e["step"] for e in logged if "step" in e])
    message = lines[0][1] if lines else "see plugin_guard_warnings in trainer_state.json; train.log has no guard line"
    return {"warnings": count, "first_step": step, "first_message": message,
            "text": f"warned {count} time{'s' if count > 1 else ''} (first at step {step}: {message})"}


def _guard_cell(verdicts: Sequence[dict]) -> str:
    total = sum(v["warnings"] for v in verdicts)
    return f"warned {total} time{'s' if total > 1 else ''}" if total else "silent"


def judge(ci, lower_is_better: bool = False) -> str:
    """"better" / "worse" / "no significant difference" from the 95% CI of (arm - baseline)."""
    lo, hi = (-ci[1], -ci[0]) if lower_is_better else ci
    return "better" if lo > 0 else "worse" if hi < 0 else "no significant difference"


def _n_text(c: dict, seeds: int) -> str:
    return f"n={c['n']}" + (f" = {seeds} seeds x {c['n'] // seeds}" if seeds > 1 else "")


def verdict_sentence(pair: dict, label: str, arm: str) -> str:
    """This run's result for one BASIC arm, on the selection metric first (the calibrated accuracy)."""
    cal, raw, nll = pair["calibrated"], pair["pooled"], pair["heldout_nll"]
    return (f"This run (test split, {_n_text(cal, len(pair['per_seed']))}): {label} {_pct(cal['acc_b'])} vs baseline "
            f"{_pct(cal['acc_a'])} calibrated, {_points(cal)}, McNemar p = {cal['mcnemar_p']:.2g}: "
            f"{judge(cal['diff_ci'])} (raw accuracy {_pct(raw['acc_b'])} vs {_pct(raw['acc_a'])}, {_points(raw)}: "
            f"{judge(raw['diff_ci'])}; held-out caption loss {nll[arm]:.3f} vs {nll['baseline']:.3f} nats/token, "
            f"{nll['diff']:+.3f} [{nll['diff_ci'][0]:+.3f}, {nll['diff_ci'][1]:+.3f}]: "
            f"{judge(nll['diff_ci'], lower_is_better=True)})." + seeds_caveat(len(pair["per_seed"])))


#: seeds below which the demo says its own difference is no evidence (the grid's yardstick uses this many)
GRID_SEEDS = 4


def seeds_caveat(seeds: int) -> str:
    """What a run with fewer seeds than the grid may and may not show."""
    if seeds >= GRID_SEEDS:
        return ""
    return (f" With {seeds} seed{'s' if seeds > 1 else ''} this is an illustration, not evidence: at this scale the "
            f"seed moves the result more than the setting does, and the grid's verdict above rests on {GRID_SEEDS} seeds.")


def terminal_table(agg: dict, labels: Dict[str, str], guard: Dict[str, str]) -> str:
    """One column per arm; below it, each BASIC arm against the baseline. ``guard``: the guard cell per arm."""
    names = list(labels)
    vs = agg["vs_baseline"]
    first = vs[names[1]]
    seeds = len(first["per_seed"])
    w = 38

    def row(title: str, cells: Sequence[str]) -> str:
        return f"{title:<{w}}" + "".join(f" {cell:>22}" for cell in cells)

    def cell(key: str, arm: str) -> str:
        c = (first if arm == "baseline" else vs[arm])[key]
        return f"{_pct(c['acc_a'])} {_ci(c['ci_a'])}" if arm == "baseline" else f"{_pct(c['acc_b'])} {_ci(c['ci_b'])}"

    lines = [row("", [labels[a] for a in names]),
             row(f"zero-shot accuracy ({_n_text(first['pooled'], seeds)})", [cell("pooled", a) for a in names])]
    if seeds > 1:
        lines.append(row("  per seed", [" ".join(_pct(x) for x in agg["seed_accuracies"][a]) for a in names]))
    lines.append(row("  calibrated (minus no-image prior)", [cell("calibrated", a) for a in names]))
    lines.append(row("held-out caption loss (nats/token)",
                     [f"{(first if a == 'baseline' else vs[a])['heldout_nll'][a]:.3f}" for a in names]))
    lens = agg["lens"]
    if lens:
        tok = lens["baseline"]["tokens_per_image"]
        lines.append(row(f"meaningful words, layer 0 (/{tok:g})",
                         [f"{lens[a]['mean_meaningful'][0]:.1f}" for a in names]))
        if seeds > 1:
            lines.append(row("  per seed", [" ".join(f"{x:.1f}" for x in agg["seed_lens_layer0"][a]) for a in names]))
        lines.append(row("meaningful words, best layer",
                         [f"{lens[a]['mean_meaningful'][lens[a]['best_layer']]:.1f} (layer {lens[a]['best_layer']})"
                          for a in names]))
    lines.append(row("lm loss, mean of last 10 steps", [f"{agg['final_lm_loss'][a]:.3f}" for a in names]))
    lines.append(row("train seconds per step", [f"{agg['step_s'][a]:.2f}" for a in names]))
    lines.append(row("guard", [guard[a] for a in names]))
    for arm in names[1:]:
        p, cal, nll, label = vs[arm]["pooled"], vs[arm]["calibrated"], vs[arm]["heldout_nll"], labels[arm]
        lines.append(f"{label} - baseline: {100 * p['diff']:+.1f} points, 95% paired-bootstrap CI "
                     f"[{100 * p['diff_ci'][0]:+.1f}, {100 * p['diff_ci'][1]:+.1f}]; McNemar exact p = {p['mcnemar_p']:.3g} "
                     f"(only baseline right: {p['only_a']}, only {label} right: {p['only_b']})")
        lines.append(f"  calibrated: {100 * cal['diff']:+.1f} points, 95% paired-bootstrap CI "
                     f"[{100 * cal['diff_ci'][0]:+.1f}, {100 * cal['diff_ci'][1]:+.1f}]; McNemar exact p = "
                     f"{cal['mcnemar_p']:.3g}")
        lines.append(f"  held-out caption loss: {nll['diff']:+.3f} nats/token, 95% paired-bootstrap CI "
                     f"[{nll['diff_ci'][0]:+.3f}, {nll['diff_ci'][1]:+.3f}] (n={nll['n']}; lower is better)")
        lines.append(f"  {power_note(p)}")
    return "\n".join(lines)


def power_note(p: dict) -> str:
    """How many paired test images a 2-point difference needs at the observed discordance."""
    disc = (p["only_a"] + p["only_b"]) / p["n"]
    if disc <= 0.0004:
        return "the two models disagree on no test image"
    return (f"discordant share {100 * disc:.1f}%: resolving a 2-point difference (McNemar, alpha 0.05, power 0.8) "
            f"needs about {mcnemar_sample_size(disc):,} paired test images")


def layer_table_md(lens: dict, labels: Dict[str, str]) -> str:
    if not lens:
        return "(no lens data)"
    tok = lens["baseline"]["tokens_per_image"]
    rows = ["| layer | " + " | ".join(f"{labels[a]} (/{tok:g})" for a in lens) + " |",
            "|---:|" + "---:|" * len(lens)]
    for layer, values in enumerate(zip(*(s["mean_meaningful"] for s in lens.values()))):
        rows.append(f"| {layer} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(rows)


def top_tokens_md(lens: dict, layers: Sequence[int], labels: Dict[str, str]) -> str:
    rows = ["| layer | model | most frequent nearest tokens (count) |", "|---:|---|---|"]
    for layer in layers:
        for arm in lens:
            top = lens[arm]["top_tokens"].get(layer) or lens[arm]["top_tokens"].get(str(layer)) or []
            shown = ", ".join(f"`{t!r}` ({c})" for t, c in top[:6])
            rows.append(f"| {layer} | {labels[arm]} | {shown} |")
    return "\n".join(rows)


def captions_md(runs: Dict[str, Dict[str, dict]], labels: Dict[str, str]) -> str:
    first = next(iter(runs.values()))
    rows = ["| image | reference | " + " | ".join(labels[a] for a in first) + " |", "|---|---|" + "---|" * len(first)]
    esc = lambda s: s.replace("|", "\\|") or "(empty)"  # noqa: E731
    for samples in zip(*(run["eval"]["captions"] for run in first.values())):
        a = samples[0]
        rows.append(f"| ![]({'data/images/' + a['image']}) `{a['id']}` | {esc(a['reference'])} | "
                    + " | ".join(esc(s["generated"]) for s in samples) + " |")
    return "\n".join(rows)


def write_report(out: Path, runs: Dict[str, Dict[str, dict]], *, cfg: dict, data: dict, paths: dict,
                 timings: dict, arms: Dict[str, dict], tiny: bool = False) -> dict:
    """Write the plots and reports under ``out``; print the terminal table; return the summary (with ``line``).

    ``arms``: ``{arm: {"flags", "label", "title"}}`` (:func:`basic_plugin.lab.demo.run.plan_arms`), in the
    order of ``runs[seed]``, the baseline first.
    """
    from basic_plugin.lab.demo import selected
    from basic_plugin.lab.lens import plot_layers

    out = Path(out)
    labels = {arm: spec["label"] for arm, spec in arms.items()}
    agg = aggregate(runs)
    guard = {seed: {arm: guard_verdict(run["dir"]) for arm, run in seed_runs.items()}
             for seed, seed_runs in runs.items()}
    guard_cells = {arm: _guard_cell([g[arm] for g in guard.values()]) for arm in arms}
    losses_png = plot_losses(runs, out / "losses.png", labels)
    health_png = plot_health(runs, out / "health.png", labels)
    lens_png = None
    if agg["lens"]:
        layers = len(agg["lens"]["basic"]["mean_meaningful"]) - 1
        depth = default_depth(layers)
        flags = list(arms["basic"]["flags"])
        if "--basic_depth" in flags[:-1]:
            depth = int(flags[flags.index("--basic_depth") + 1])
        lens_png = plot_layers({labels[a]: s for a, s in agg["lens"].items()}, out / "lens.png",
                               title="Image tokens whose nearest word is meaningful"
                                     + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""), depth=depth)
    table = terminal_table(agg, labels, guard_cells)
    print(table, flush=True)
    basics = [arm for arm in arms if arm != "baseline"]
    verdict = {"grid": selected.VERDICT, "selected": selected.NAME,
               "runs": {arm: verdict_sentence(agg["vs_baseline"][arm], labels[arm], arm) for arm in basics}}
    lens = agg["lens"]
    layers = len(lens["baseline"]["mean_meaningful"]) if lens else 0
    show = sorted({0, 1, max(0, layers // 4), max(0, layers // 2), max(0, layers - 1)}) if lens else []
    model = "tiny random LLaVA (tests)" if tiny else "SmolLM2-135M-Instruct (30 layers) + DINOv2-small @112 px (64 image tokens)"
    md = [
        "# basic-llava demo: baseline vs BASIC",
        "",
        "## Verdict",
        "",
        f"What the validation grid found (docs/RESULTS.md, `basic-llava sweep`): {selected.VERDICT}",
        *verdict["runs"].values(),
        "",
        "## Setup",
        "",
        f"Model: {model}; projector `mlp2x_gelu` trained (LLaVA stage 1, `plain` template, ZeRO-2), LLM and tower frozen.",
        f"Training: {cfg['steps']} steps x batch {cfg['batch']} ({cfg['train_images']} Fashion-MNIST captions), "
        f"lr {cfg['lr']}, {cfg['seeds']} seed(s); every arm with the same seed, projector init, data and order:",
        "",
        *[f"* {spec['title']}, column \"{spec['label']}\", run folder `seed*/{arm}`: "
          f"`{shlex.join(['--basic', 'True', *spec['flags']])}`" for arm, spec in arms.items()],
        "",
        "## Summary",
        "",
        "```",
        table,
        "```",
        "",
        "## Zero-shot accuracy (10-way, held-out Fashion-MNIST test images)",
        "",
    ]
    for arm in basics:
        pair, label = agg["vs_baseline"][arm], labels[arm]
        md += [f"### {label} vs baseline", "",
               f"| | n | baseline | {label} | {label} - baseline | McNemar p |", "|---|---:|---:|---:|---:|---:|"]
        rows = [(f"seed {seed}", c) for seed, c in pair["per_seed"].items()]
        if len(runs) > 1:
            rows.append(("pooled", pair["pooled"]))
        rows.append((f"calibrated{' (pooled)' if len(runs) > 1 else ''}", pair["calibrated"]))
        for name, c in rows:
            md.append(f"| {name} | {c['n']} | {_pct(c['acc_a'])} {_ci(c['ci_a'])} | {_pct(c['acc_b'])} {_ci(c['ci_b'])} | "
                      f"{_points(c).replace(' points', '')} | {c['mcnemar_p']:.3g} |")
        md += ["", power_note(pair["pooled"]) + ".", ""]
    md += ["Intervals: 95% Wilson for accuracies, 95% paired bootstrap for the difference; chance is 10%. "
           "Calibrated: each caption's log-likelihood minus its log-likelihood without the image (PMI), so "
           "a model's taste for some class names is not counted as recognising them.", "",
           "## BASIC's guard", "",
           "What the guard (`--basic_guard`, on by default) said during training, from each run's `train.log` "
           "and `trainer_state.json`: a collapse of the image tokens, or BASIC's terms out-weighing the caption "
           "loss.", ""]
    md += [f"* {labels[arm]}" + (f", seed {seed}" if len(runs) > 1 else "") + f": {g[arm]['text']}"
           for seed, g in guard.items() for arm in arms]
    md.append("")
    if lens:
        md += ["## Nearest vocabulary words of the image tokens, per layer", "",
               f"![lens]({Path(lens_png).name})", "",
               f"Mean count per image over {lens['baseline']['images']} held-out images (of "
               f"{lens['baseline']['tokens_per_image']:g} image tokens) whose nearest input-embedding row (cosine) is a "
               "meaningful word (alphabetic, >= 3 letters, not a stop word / special / byte piece; see "
               "`basic_plugin/lab/lens.py`). Layer 0 is the projector output; the last layer is after the final norm.", "",
               layer_table_md(lens, labels), "", top_tokens_md(lens, show, labels), ""]
    md += ["## Training losses", "", f"![losses]({losses_png.name})", ""]
    if health_png:
        md += ["## BASIC's health metrics", "", f"![health]({health_png.name})", "",
               "Per logging step, 5-step mean. The baseline arm runs BASIC with both lambdas at 0: it trains "
               "exactly as LLaVA does and logs the same curves. A pairwise cosine near 1 is a collapse of an "
               "image's tokens onto one direction; the share is BASIC's part of the loss.", ""]
    md += [
           "## Greedy captions (seed 0)", "", captions_md(runs, labels), "",
           "## Timings (seconds)", "", "| phase | s |", "|---|---:|"]
    md += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    md += ["", f"Runs: {', '.join(run['dir'] for arms_ in runs.values() for run in arms_.values())}", ""]
    (out / "report.md").write_text("\n".join(md))

    body = [f"<h1>basic-llava demo: baseline vs BASIC</h1><h2>Verdict</h2><p>What the validation grid found "
            f"(docs/RESULTS.md): {html.escape(selected.VERDICT)}</p>"
            + "".join(f"<p>{html.escape(s)}</p>" for s in verdict["runs"].values())
            + f"<p>{html.escape(model)}</p><pre>{html.escape(table)}</pre>"]
    if lens_png:
        body.append(f'<h2>Nearest vocabulary words per layer</h2><img src="{Path(lens_png).name}">')
    body.append(f'<h2>Training losses</h2><img src="{losses_png.name}">')
    if health_png:
        body.append(f'<h2>BASIC health metrics</h2><img src="{health_png.name}">')
    first = next(iter(runs.values()))
    rows = "".join(
        f"<tr><td><img src=\"data/images/{html.escape(samples[0]['image'])}\" width=96><br>"
        f"{html.escape(samples[0]['id'])}</td><td>{html.escape(samples[0]['reference'])}</td>"
        + "".join(f"<td>{html.escape(s['generated'])}</td>" for s in samples) + "</tr>"
        for samples in zip(*(run["eval"]["captions"] for run in first.values())))
    heads = "".join(f"<th>{html.escape(labels[a])}</th>" for a in first)
    body.append(f"<h2>Greedy captions</h2><table border=1 cellpadding=4><tr><th>image</th><th>reference</th>"
                f"{heads}</tr>{rows}</table>")
    (out / "report.html").write_text("<!doctype html><meta charset=utf-8><title>basic-llava demo</title>"
                                     "<body style='font-family:sans-serif'>" + "".join(body) + "</body>")

    lens_note = ""
    if lens:
        lens_note = (f"; meaningful nearest words at the LLM input {lens['baseline']['mean_meaningful'][0]:.1f} -> "
                     f"{lens['basic']['mean_meaningful'][0]:.1f} of {lens['baseline']['tokens_per_image']:g}")
    cal, raw = agg["calibrated"], agg["pooled"]
    line = (f"[demo] done in {{total}}: {labels['basic']} vs baseline, zero-shot accuracy calibrated "
            f"{_pct(cal['acc_b'])} vs {_pct(cal['acc_a'])} ({_points(cal)}, McNemar p={cal['mcnemar_p']:.2g}): "
            f"{judge(cal['diff_ci'])}; raw {_pct(raw['acc_b'])} vs {_pct(raw['acc_a'])} ({_points(raw)}, "
            f"McNemar p={raw['mcnemar_p']:.2g}): {judge(raw['diff_ci'])} (n={raw['n']}, this run's seeds only: the "
            f"grid's verdict is the first line){lens_note}; report: {out / 'report.md'}")
    summary = {"cfg": cfg, "paths": paths, "data": data, "timings": timings, "arms": arms, "verdict": verdict,
               "guard": guard, "aggregate": agg,
               "runs": {s: {a: {"dir": r["dir"], "accuracy": r["eval"]["accuracy"], "wall_s": r.get("wall_s")}
                            for a, r in seed_runs.items()} for s, seed_runs in runs.items()},
               "line": line}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
