"""How hard BASIC's terms pull the projector during the grid's runs, next to the caption loss.

The grid's runs (``basic-llava sweep``) save their projector every 100 steps; at each saved
projector of a run, :mod:`basic_plugin.lab.pull` measures the per-term gradients on the run's
first training batches, with the run's own BASIC flags (a target variant measured as it trains;
the monitor arm with the paper's weights: how hard BASIC would pull it). Writes ``pull.json`` and
``pull.png`` under ``--out``::

    .venv/bin/python scripts/pull_over_training.py --grid runs/grid --config paper --config drop --out runs/pull

docs/RESULTS.md (the mechanism) shows the result.
"""
import argparse
import json
import sys
from pathlib import Path


def saved_projectors(run_dir: Path, steps: int):
    """``[(step, folder)]``: the run's checkpoints, and the run folder itself for its last step."""
    found = {int(p.name.split("-")[1]): p for p in run_dir.glob("checkpoint-*") if (p / "mm_projector.bin").is_file()}
    found[steps] = run_dir
    return sorted(found.items())


def main(argv=None) -> int:
    import shutil

    import torch

    from basic_plugin.host.forward import with_plugin_forward
    from basic_plugin.lab.lens import load_llava
    from basic_plugin.lab.pull import caption_batch, parse_basic_flags, pulls
    from basic_plugin.lab.sweep import MONITOR_FLAGS, chosen_length
    from llava.model import LlavaLlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help="the sweep's --out folder")
    p.add_argument("--steps", type=int, default=None, help="the runs' length (default: the grid's length.json)")
    p.add_argument("--config", action="append", required=True, help="grid configuration(s), e.g. paper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    grid, out = Path(args.grid), Path(args.out)
    steps = args.steps or chosen_length(grid)
    results = {}
    for name in args.config:
        run_dir = grid / f"steps{steps}" / name / f"seed{args.seed}"
        targs = json.loads((run_dir / "sweep_args.json").read_text())
        flags = targs[targs.index("--basic") + 2:]
        flags = flags[:flags.index("--save_strategy")] if "--save_strategy" in flags else flags
        measured = flags if flags != MONITOR_FLAGS else []  # the monitor arm: the paper's weights
        overrides = parse_basic_flags(" ".join(measured))
        lambda_das = overrides.pop("basic_lambda_das", 1.0)
        lambda_sds = overrides.pop("basic_lambda_sds", 0.01)
        data = Path(targs[targs.index("--data_path") + 1])
        folder = targs[targs.index("--image_folder") + 1]
        base = targs[targs.index("--model_name_or_path") + 1]
        records = json.loads(data.read_text())[:args.batches * 8]
        per_step = {}
        for step, saved in saved_projectors(run_dir, steps):
            if not (saved / "config.json").is_file():
                shutil.copy(run_dir / "config.json", saved / "config.json")
            torch.manual_seed(0)
            tok, model, proc = load_llava(saved, base, model_class=with_plugin_forward(LlavaLlamaForCausalLM))
            batches = [caption_batch(records[i:i + 8], tok, proc, model.config, folder) for i in range(0, len(records), 8)]
            r = per_step[step] = pulls(model, batches, lambda_das=lambda_das, lambda_sds=lambda_sds,
                                       overrides=overrides, tokenizer=tok)
            print(f"[pull] {name} step {step}: |g_das|/|g_lm| {r['das_over_lm']:.3f}, cos {r['cos_das_lm']:+.3f}, "
                  f"on the massive channels {r['massive_channels']} {100 * r['das_massive_share']:.1f}% "
                  f"(g_lm {100 * r['lm_massive_share']:.1f}%), its own top-5 {r['das_gradient_top']} "
                  f"{100 * r['das_gradient_top_share']:.1f}%; |g_sds|/|g_lm| {r['sds_over_lm']:.3f}", flush=True)
        results[name] = {"flags": measured, "steps": per_step}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pull.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "pull.png")
    return 0


def plot(results: dict, path: Path) -> None:
    from basic_plugin.lab.plots import save, subplots

    panels = (("das_over_lm", "|grad L_das| / |grad caption loss|"),
              ("cos_das_lm", "cos(grad L_das, grad caption loss)"),
              ("das_massive_share", "grad L_das on the LLM's massive channels"),
              ("das_gradient_top_share", "grad L_das on its own top-5 channels"))
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), dpi=90)
    for i, (name, r) in enumerate(results.items()):
        steps = sorted(r["steps"], key=int)
        for ax, (key, title) in zip(axes, panels):
            ax.plot([int(s) for s in steps], [r["steps"][s][key] for s in steps], marker="o",
                    color="black" if name == "monitor" else f"C{i}", label=name)
            ax.set_title(title, fontsize=9)
    axes[1].axhline(0, color="0.7", lw=1)
    for ax in axes:
        ax.set_xlabel("step (the run's projector at that step)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
