"""Meaningful nearest words of the grid's trained projectors, per configuration and seed.

The paper's analysis (``basic-llava lens``, :mod:`basic_plugin.lab.lens`) on every run of a
``basic-llava sweep`` grid: each run's image tokens on the first ``--images`` validation images,
at the LLM's input (layer 0, the projector's output), after BASIC's target depth and at the best
layer. Each run's summary is kept in ``<run>/lens_val.json`` and reused; the table (mean over the
seeds, then each seed) is printed and written to ``<out>/lens.md`` and ``<out>/lens.json``::

    .venv/bin/python scripts/grid_lens.py --grid runs/grid --config monitor --config paper --out runs/lens

docs/RESULTS.md (the grid) shows the result.
"""
import argparse
import json
import statistics
from pathlib import Path


def run_summary(grid: Path, run_dir: Path, n_images: int) -> dict:
    """The lens summary of one run on its grid's first ``n_images`` validation images (cached)."""
    cached = run_dir / "lens_val.json"
    if cached.is_file():
        summary = json.loads(cached.read_text())
        if summary.get("images") == n_images:
            return summary
    from basic_plugin.lab.lens import load_llava, run_lens

    targs = json.loads((run_dir / "sweep_args.json").read_text())
    base = targs[targs.index("--model_name_or_path") + 1]
    val = json.loads((grid / "data" / "val.json").read_text())  # the sweep's data folder
    files = [grid / "data" / "images" / r["image"] for r in val[:n_images]]
    tokenizer, model, processor = load_llava(run_dir, base)
    summary = run_lens(model, tokenizer, processor, files, progress=False)
    cached.write_text(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    from basic_plugin.lab.sweep import chosen_length

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", required=True, help="the sweep's --out folder")
    p.add_argument("--steps", type=int, default=None, help="the runs' length (default: the grid's length.json)")
    p.add_argument("--config", action="append", required=True, help="grid configuration(s), e.g. paper")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 (default 4)")
    p.add_argument("--images", type=int, default=30, help="validation images per run (the paper used 30)")
    p.add_argument("--depth", type=int, default=15, help="BASIC's target depth k (default 15, L/2 of SmolLM2)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    grid, out = Path(args.grid), Path(args.out)
    steps = args.steps or chosen_length(grid)
    table, rows = {}, ["| configuration | layer 0 (seeds) | after layer k (seeds) | best layer (seeds) |", "|---|---|---|---|"]
    for name in args.config:
        per_seed = []
        for seed in range(args.seeds):
            s = run_summary(grid, grid / f"steps{steps}" / name / f"seed{seed}", args.images)
            mm = s["mean_meaningful"]
            per_seed.append({"layer0": mm[0], "layer_k": mm[args.depth], "best": max(mm), "best_layer": s["best_layer"],
                             "per_layer": mm})
            print(f"{name} seed {seed}: {mm[0]:.1f} at the input, {mm[args.depth]:.1f} after layer {args.depth}, "
                  f"best {max(mm):.1f} (layer {s['best_layer']}) of {s['tokens_per_image']:g}", flush=True)
        table[name] = per_seed

        def cell(key):
            v = [r[key] for r in per_seed]
            return f"{statistics.fmean(v):.1f} ({' / '.join(f'{x:.1f}' for x in v)})"

        rows.append(f"| {name} | {cell('layer0')} | {cell('layer_k')} | {cell('best')} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens.json").write_text(json.dumps({"steps": steps, "images": args.images, "depth": args.depth,
                                               "runs": table}, indent=1))
    md = "\n".join(rows) + "\n"
    (out / "lens.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
