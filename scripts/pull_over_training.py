"""How hard BASIC's terms pull the projector during a sweep run, next to the caption loss.

Trains a run of ``basic-llava sweep`` again with its own arguments, saving the projector every
``--every`` steps (LLaVA's adapter-only checkpoints; saving does not change the run: the final
projector is checked to be bit-identical to the sweep's), then measures at each checkpoint,
with the paper's weights, the per-term gradients of :mod:`basic_plugin.lab.pull` on the run's
first training batches. Writes ``pull.json`` and ``pull.png`` under ``--out``::

    .venv/bin/python scripts/pull_over_training.py --sweep runs/sweep --config monitor --config paper --out runs/pull

docs/RESULTS.md (the mechanism) shows the result.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path


def checkpoints(run_dir: Path):
    """``[(step, folder)]`` of the adapter checkpoints, by step."""
    return sorted((int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*") if (p / "mm_projector.bin").is_file())


def main(argv=None) -> int:
    import torch

    from basic_plugin.host.forward import with_plugin_forward
    from basic_plugin.lab.demo.run import run_training
    from basic_plugin.lab.lens import load_llava
    from basic_plugin.lab.pull import caption_batch, pulls
    from llava.model import LlavaLlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="the sweep's --out folder")
    p.add_argument("--config", action="append", required=True, help="sweep configuration(s), e.g. paper")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    sweep, out = Path(args.sweep), Path(args.out)
    results = {}
    for name in args.config:
        source = sweep / name / f"seed{args.seed}"
        targs = json.loads((source / "sweep_args.json").read_text())
        run_dir = out / name
        steps = int(targs[targs.index("--max_steps") + 1])
        if not (run_dir / "mm_projector.bin").is_file():
            targs[targs.index("--output_dir") + 1] = str(run_dir)
            run_training(targs + ["--save_strategy", "steps", "--save_steps", str(args.every)], run_dir, steps,
                         desc=f"{name} s{args.seed}", threads=1)
        same = all(torch.equal(a, b) for a, b in zip(
            torch.load(run_dir / "mm_projector.bin", weights_only=True).values(),
            torch.load(source / "mm_projector.bin", weights_only=True).values()))
        print(f"[pull] {name}: final projector bit-identical to the sweep's: {same}", flush=True)
        data = Path(targs[targs.index("--data_path") + 1])
        folder = targs[targs.index("--image_folder") + 1]
        base = targs[targs.index("--model_name_or_path") + 1]
        records = json.loads(data.read_text())[:args.batches * 8]
        per_step = {}
        saved = checkpoints(run_dir)
        for step, folder_n in saved + ([] if saved and saved[-1][0] == steps else [(steps, run_dir)]):
            if not (folder_n / "config.json").is_file():
                shutil.copy(run_dir / "config.json", folder_n / "config.json")
            torch.manual_seed(0)
            tok, model, proc = load_llava(folder_n, base, model_class=with_plugin_forward(LlavaLlamaForCausalLM))
            batches = [caption_batch(records[i:i + 8], tok, proc, model.config, folder) for i in range(0, len(records), 8)]
            r = per_step[step] = pulls(model, batches, lambda_das=1.0, lambda_sds=0.01)
            print(f"[pull] {name} step {step}: |g_das|/|g_lm| {r['das_over_lm']:.3f}, cos {r['cos_das_lm']:+.3f}, "
                  f"top-5 share {100 * r['das_top_share']:.1f}% (g_lm {100 * r['lm_top_share']:.1f}%); "
                  f"|g_sds|/|g_lm| {r['sds_over_lm']:.3f}", flush=True)
        results[name] = {"bit_identical_to_sweep": same, "steps": per_step}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pull.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "pull.png")
    return 0


def plot(results: dict, path: Path) -> None:
    from basic_plugin.lab.plots import save, subplots

    panels = (("das_over_lm", "|grad of L_das| / |grad of caption loss|"),
              ("cos_das_lm", "cos(grad L_das, grad caption loss)"),
              ("das_top_share", "grad L_das on the target's top-5 channels"))
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 3.3), dpi=90)
    for i, (name, r) in enumerate(results.items()):
        steps = sorted(r["steps"], key=int)
        for ax, (key, title) in zip(axes, panels):
            ax.plot([int(s) for s in steps], [r["steps"][s][key] for s in steps], marker="o",
                    color="black" if name == "monitor" else f"C{i}", label=name)
            ax.set_title(title, fontsize=9)
    axes[1].axhline(0, color="0.7", lw=1)
    for ax in axes:
        ax.set_xlabel("step (projector of that step; paper's weights)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
