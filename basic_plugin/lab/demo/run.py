"""``basic-llava demo``: what BASIC does to a real (small) LLaVA, on a CPU, baseline vs BASIC.

Arms, all with the same seed (``--seed_model_init True``: same projector init), data, order and steps:

* ``baseline``: ``--basic True`` with both lambdas 0: trains exactly like LLaVA and logs BASIC's
  health curves;
* ``basic``: BASIC at the setting the validation grid (``basic-llava sweep``) chose, as recorded in
  docs/RESULTS.md and copied to :mod:`basic_plugin.lab.demo.selected`; ``--basic-flags`` replaces
  that setting;
* ``paper`` (only with ``--paper-arm``): BASIC at the paper's defaults; skipped, with a note, when
  the ``basic`` arm already is the paper's defaults (the grid chose them, no ``--basic-flags``).

The run opens with what the grid found; the report opens with a verdict: the grid's, then this
run's for each BASIC arm against the baseline.

Steps (each with a progress bar):

1. assets: ``install_assets()`` (SmolLM2-135M-Instruct as the LLM, all 30 layers; DINOv2-small
   at 112 px = 64 image tokens as the vision tower), downloaded and converted once;
2. data: ``basic-llava data`` (Fashion-MNIST captions for training, a held-out test split,
   packaged photos);
3. LLaVA stage-1 projector pretraining of every arm through LLaVA's own ``train()``
   (``python -m basic_plugin.lab.train`` under DeepSpeed's launcher, ZeRO-2, 1 rank, ``plain``
   template, ``--tune_mm_mlp_adapter True``), up to one arm per core at once;
4. evaluation of every arm (:mod:`basic_plugin.lab.demo.evaluate`): 10-way zero-shot accuracy
   (raw and calibrated) on held-out images with 95% Wilson intervals and a paired McNemar test
   against the baseline, BASIC's per-layer nearest-word analysis (:mod:`basic_plugin.lab.lens`),
   greedy captions of the packaged photos;
5. report (:mod:`basic_plugin.lab.demo.report`): verdict, terminal table, ``report.md`` /
   ``report.html``, ``losses.png``, ``health.png``, ``lens.png``, ``summary.json`` under ``--out``
   (default ``runs/demo``).

Trained runs (``--out``/seed{N}/{arm}) and their evaluations are reused when their arguments are
unchanged (``--retrain`` to redo them).
By default the demo trains as the grid does (its length, its 3,200 training captions, its checkpoints),
so its runs are the grid's seed-0 runs bit for bit on the same machine.
``--full``: 3 seeds, 6000 held-out images: at the discordance seen in the default run
(the two models disagree on about 28% of the images), McNemar's test needs about 5,500 paired
images to resolve a 2-point accuracy difference (alpha 0.05, power 0.8); the report prints this
number for the run at hand. Hours on a CPU.
``--tiny``: the tiny random model of :mod:`basic_plugin.lab.tiny` (tests only).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from basic_plugin.host.usage import CommandParser
from basic_plugin.lab.argv import strip_separator
from basic_plugin.lab.demo import selected

#: the grid's yardstick (basic_plugin.lab.sweep): its length, training set, validation and test sizes and
#: checkpoints, so that the demo's runs are the grid's seed-0 runs bit for bit
DEFAULTS = {"steps": selected.STEPS, "batch": 8, "test": 300, "val": 300, "train_images": 3200, "save_every": 100,
            "lens_images": 30, "seeds": 1, "lr": 1e-3}
FULL = {"test": 6000, "seeds": 3}
TINY = {"steps": 2, "batch": 2, "test": 10, "val": 0, "train_images": 4, "save_every": 0, "lens_images": 4,
        "seeds": 1}

#: the baseline arm: BASIC on with both lambdas 0 (no effect on training, same curves logged)
MONITOR_FLAGS = ("--basic_lambda_das", "0", "--basic_lambda_sds", "0")
EVAL_FORMAT = 2  # 2: calibrated accuracy and confusion matrices


def run_training(args: Sequence[str], out_dir: Path, steps: int, *, deepspeed: bool = True, desc: str = "train",
                 progress: bool = True, threads: Optional[int] = None, position: int = 0,
                 timeout: float = 4 * 3600) -> dict:
    """One training run (:func:`basic_plugin.lab.launch.run`), a progress bar fed by its progress file.

    ``deepspeed``: under DeepSpeed's launcher with 1 rank. ``threads``: ``OMP_NUM_THREADS`` of
    the run (None: inherited). Writes ``command.txt``, ``train.log`` and
    ``train.progress.jsonl`` in ``out_dir``; returns its ``log_history``, wall time and end time.
    """
    from tqdm.auto import tqdm

    from basic_plugin.lab import launch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, position=position, leave=True)

    def show(record: dict) -> None:
        if record.get("step", 0) > bar.n:
            bar.update(record["step"] - bar.n)
        if isinstance(record.get("lm_loss"), (int, float)):
            bar.set_postfix_str(f"lm_loss {record['lm_loss']:.3f}")

    try:
        run = launch.run("basic_plugin.lab.train", args, output_dir=out_dir, ranks=1 if deepspeed else None,
                         threads=threads, timeout=timeout, log_path=out_dir / "train.log",
                         command_file=out_dir / "command.txt", on_progress=show)
    finally:
        bar.close()
    if not (out_dir / "mm_projector.bin").is_file():
        raise RuntimeError(f"training left no mm_projector.bin in {out_dir}; log: {run['log']}")
    return {"log_history": run["log_history"], "wall_s": run["wall_s"],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def plan_arms(basic_flags: str = "", paper_arm: bool = False) -> Tuple[Dict[str, dict], Optional[str]]:
    """The arms to train, ``{arm: {"flags", "label", "title"}}``, and a note when ``--paper-arm`` is dropped.

    ``basic`` is the setting the grid chose (:mod:`basic_plugin.lab.demo.selected`) unless
    ``basic_flags`` (``--basic-flags``) replace it. ``paper`` would train the very same run as
    ``basic`` when both are the paper's defaults, so it is then skipped.
    """
    arms = {"baseline": {"flags": list(MONITOR_FLAGS), "label": "baseline",
                         "title": "baseline (BASIC, both lambdas 0: trains exactly like LLaVA, logs BASIC's curves)"}}
    given = shlex.split(basic_flags)
    if given:
        arms["basic"] = {"flags": given, "label": "BASIC flags", "title": f"BASIC (--basic-flags {shlex.join(given)})"}
    else:
        setting = shlex.join(selected.FLAGS) or "the paper's defaults"
        arms["basic"] = {"flags": list(selected.FLAGS), "label": "BASIC chosen",
                         "title": f"BASIC (chosen on validation: {selected.NAME}, {setting})"}
    if not paper_arm:
        return arms, None
    if not arms["basic"]["flags"]:
        return arms, "--paper-arm: skipped, the basic arm already is BASIC at the paper's defaults"
    arms["paper"] = {"flags": [], "label": "BASIC paper", "title": "BASIC (the paper's defaults)"}
    return arms, None


def train_args(paths: Dict[str, str], data: Dict[str, str], out_dir: Path, *, arm: str, steps: int, batch: int,
               seed: int, lr: float, deepspeed: bool, basic_flags: Sequence[str] = (), save_every: int = 0) -> List[str]:
    """LLaVA's pretrain.sh arguments for a CPU run (:func:`basic_plugin.lab.llava_args.cpu_args`) of one arm.

    Every arm but ``baseline`` is BASIC with ``basic_flags``. The seeds, the learning rate and
    ``--model_max_length 128`` come after the builder's flags (the last value of a repeated flag
    wins), as in the lists stored with finished runs.
    """
    from basic_plugin.lab.llava_args import cpu_args

    extra = ["--seed", str(seed), "--data_seed", str(seed), "--seed_model_init", "True",
             "--learning_rate", str(lr), "--model_max_length", "128"]
    if arm == "baseline":  # BASIC monitoring only: trains exactly as LLaVA does (bit for bit), logs BASIC's curves
        extra += ["--basic", "True", *MONITOR_FLAGS]
    else:
        extra += ["--basic", "True", *basic_flags]
    if save_every:  # the projector every N steps (LLaVA's adapter checkpoints; the run is unchanged)
        extra += ["--save_strategy", "steps", "--save_steps", str(save_every)]
    return cpu_args(model=paths["lm"], vision_tower=paths["vision"], data_path=data["train"],
                    image_folder=data["image_folder"], output_dir=out_dir, stage="pretrain", max_steps=steps,
                    batch=batch, deepspeed="zero2" if deepspeed else None, gradient_checkpointing=False, extra=extra)


def evaluate_arms(kwargs: Dict[str, dict], *, workers: int, threads: int, progress: bool, seed) -> Dict[str, dict]:
    """Evaluate each arm (``evaluate_model(**kwargs[arm])``): here one after the other when ``workers`` is 1,
    else in spawned processes, ``workers`` at a time with ``threads`` threads each (as in training)."""
    from tqdm.auto import tqdm

    from basic_plugin.lab.demo.evaluate import evaluate_model, evaluation_worker

    total = {arm: kw["n_test"] + min(4, kw["n_test"]) + len(json.loads(Path(kw["data"]["photos"]).read_text()))
             for arm, kw in kwargs.items()}
    bars = {arm: tqdm(total=total[arm], desc=f"eval  {arm:<8} s{seed}", unit="img", position=i, leave=True,
                      disable=not progress) for i, arm in enumerate(kwargs)}
    results: Dict[str, dict] = {}
    try:
        if workers < 2 or len(kwargs) < 2:
            import torch

            torch.set_num_threads(threads)
            for arm, kw in kwargs.items():
                results[arm] = evaluate_model(**kw, on_progress=bars[arm].update)
            return results
        import multiprocessing as mp
        import queue as queue_mod

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        waiting = list(kwargs)
        procs = {}
        while len(results) < len(kwargs):
            while waiting and len(procs) - len(results) < workers:
                arm = waiting.pop(0)
                procs[arm] = ctx.Process(target=evaluation_worker, args=(arm, kwargs[arm], threads, q), daemon=True)
                procs[arm].start()
            try:
                kind, arm, payload = q.get(timeout=5)
            except queue_mod.Empty:
                dead = [a for a, p in procs.items() if not p.is_alive() and a not in results]
                if dead and q.empty():
                    raise RuntimeError(f"evaluation process(es) {dead} died without a result")
                continue
            if kind == "progress":
                bars[arm].update(payload)
            elif kind == "done":
                results[arm] = payload
                procs[arm].join()
            else:
                for proc in procs.values():
                    proc.terminate()
                raise RuntimeError(f"evaluating {arm} failed:\n{payload}")
        return results
    finally:
        for bar in bars.values():
            bar.close()



def build_parser() -> argparse.ArgumentParser:
    p = CommandParser("demo", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=int, default=None, help=f"per-step batch (default {DEFAULTS['batch']})")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...); default 1")
    p.add_argument("--test", type=int, default=None, help=f"held-out test images (default {DEFAULTS['test']})")
    p.add_argument("--lens-images", type=int, default=None, help="test images for the per-layer analysis (default 30, as the paper)")
    p.add_argument("--lr", type=float, default=None, help="projector learning rate (default 1e-3, LLaVA's)")
    p.add_argument("--full", action="store_true", help="3 seeds, 6000 test images (hours on a CPU)")
    p.add_argument("--basic-flags", default="",
                   help='BASIC flags for the basic arm, replacing the setting the grid chose '
                        '(basic_plugin/lab/demo/selected.py), e.g. "--basic_depth 10"')
    p.add_argument("--paper-arm", action="store_true",
                   help="also train BASIC at the paper's defaults (arm 'paper'); skipped when the basic arm "
                        "already is the paper's defaults")
    p.add_argument("--fmnist-dir", default=None, help="Fashion-MNIST idx folder (default: the Debian package's)")
    p.add_argument("--cache-dir", default=None, help="assets cache (default ~/.cache/basic-llava/assets)")
    p.add_argument("--no-deepspeed", action="store_true", help="train without DeepSpeed's launcher")
    p.add_argument("--sequential", action="store_true",
                   help="one arm at a time with all cores (default: up to one arm per core at once)")
    p.add_argument("--retrain", action="store_true", help="train again even when a finished run matches")
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of the real parts (tests only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve(args) -> dict:
    cfg = dict(DEFAULTS)
    if args.full:
        cfg.update(FULL)
    if args.tiny:
        cfg.update(TINY)
    for key in ("steps", "batch", "seeds", "test", "lens_images", "lr"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if min(cfg["steps"], cfg["batch"], cfg["seeds"], cfg["test"]) < 1:
        raise SystemExit("basic-llava demo: --steps, --batch, --seeds and --test must be positive")
    cfg["train_images"] = max(cfg["train_images"], cfg["steps"] * cfg["batch"])  # one epoch at most
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(strip_separator(argv))
    cfg = resolve(args)
    arms, note = plan_arms(args.basic_flags, args.paper_arm)
    progress = not args.quiet
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()

    from basic_plugin.lab.demo import data as demo_data, selected
    from basic_plugin.lab.demo.report import write_report
    from basic_plugin.lab.provenance import code_version, machine

    print(f"[demo] what the grid found (docs/RESULTS.md): {selected.VERDICT}", flush=True)
    for arm, spec in arms.items():
        print(f"[demo] arm {arm}: {spec['title']}: {shlex.join(['--basic', 'True', *spec['flags']])}", flush=True)
    if note:
        print(f"[demo] {note}", flush=True)

    # 1. assets
    print(f"[demo] 1/5 assets ({'tiny random model' if args.tiny else 'SmolLM2-135M-Instruct + DINOv2-small 112 px'})",
          flush=True)
    t = time.perf_counter()
    if args.tiny:
        from basic_plugin.lab.tiny import IMAGE_SIZE, build_tiny_llava

        tiny_root = out / "tiny_model"
        if not (tiny_root / "lm" / "config.json").is_file():
            built = build_tiny_llava(tiny_root, seed=0, vocab_extra=demo_data.PHRASES)
        else:
            built = {"lm": tiny_root / "lm", "vision": tiny_root / "vision"}
        paths = {"lm": str(built["lm"]), "vision": str(built["vision"])}
        size = IMAGE_SIZE
    else:
        from basic_plugin.lab.assets import install_assets

        assets = install_assets(args.cache_dir, progress=progress)
        paths = {"lm": assets["llm"], "vision": assets["vision_112"]}
        size = 112
    timings["assets"] = time.perf_counter() - t

    # 2. data
    print(f"[demo] 2/5 data: {cfg['train_images']} training captions, {cfg['test']} held-out test images", flush=True)
    t = time.perf_counter()
    fmnist_dir = args.fmnist_dir or demo_data.FMNIST_DIR
    if not demo_data.fmnist_available(fmnist_dir):
        print(f"basic-llava demo: Fashion-MNIST not found in {fmnist_dir}.\nInstall it with:\n"
              f"    {demo_data.INSTALL_HINT}\n(as root, or with sudo; scripts/demo.sh does it for you)", file=sys.stderr)
        return 2
    data = demo_data.build_dataset(out / "data", train=cfg["train_images"], test=cfg["test"], val=cfg["val"],
                                   size=size, seed=0, fmnist_dir=fmnist_dir, progress=progress)
    timings["data"] = time.perf_counter() - t

    # 3. training: up to one arm per core at once (one rank each), or one after the other (--sequential)
    cores = os.cpu_count() or 1
    parallel = not args.sequential and cores >= 2
    runs: Dict[str, Dict[str, dict]] = {}
    t = time.perf_counter()
    for seed in range(cfg["seeds"]):
        jobs = {}
        for arm, spec in arms.items():
            run_dir = out / f"seed{seed}" / arm
            targs = train_args(paths, data, run_dir, arm=arm, steps=cfg["steps"], batch=cfg["batch"], seed=seed,
                               lr=cfg["lr"], deepspeed=not args.no_deepspeed, basic_flags=spec["flags"],
                               save_every=cfg["save_every"])
            stamp = run_dir / "demo_args.json"
            done = (not args.retrain and stamp.is_file() and json.loads(stamp.read_text()) == targs
                    and (run_dir / "mm_projector.bin").is_file() and (run_dir / "demo_result.json").is_file())
            if done:
                runs.setdefault(str(seed), {})[arm] = {"dir": str(run_dir),
                                                       **json.loads((run_dir / "demo_result.json").read_text())}
            else:
                if stamp.exists():
                    stamp.unlink()
                jobs[arm] = (run_dir, targs, stamp)
        workers = min(cores, len(jobs)) if parallel else 1
        threads = max(1, cores // max(1, workers))
        reused = [arm for arm in arms if arm not in jobs]
        print(f"[demo] 3/5 train seed {seed}: {cfg['steps']} steps x batch {cfg['batch']}, "
              + (f"{len(jobs)} arms, {workers} at a time, 1 rank and {threads} thread(s) each" if workers > 1
                 else f"{threads} thread(s)") + (f"; reused finished run(s): {', '.join(reused)}" if reused else ""),
              flush=True)

        def train_one(arm, position):
            run_dir, targs, stamp = jobs[arm]
            result = run_training(targs, run_dir, cfg["steps"], deepspeed=not args.no_deepspeed,
                                  desc=f"train {arm:<8} s{seed}", progress=progress, threads=threads, position=position)
            (run_dir / "demo_result.json").write_text(json.dumps({**result, "code": code_version(), "machine": machine()}))
            stamp.write_text(json.dumps(targs))
            return result

        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                futures = {arm: pool.submit(train_one, arm, i) for i, arm in enumerate(jobs)}
                results = {arm: f.result() for arm, f in futures.items()}
        else:
            results = {arm: train_one(arm, 0) for arm in jobs}
        for arm, result in results.items():
            runs.setdefault(str(seed), {})[arm] = {"dir": str(jobs[arm][0]), **result}
        runs[str(seed)] = {arm: runs[str(seed)][arm] for arm in arms}
    timings["train"] = time.perf_counter() - t

    # 4. evaluation, up to one arm per core at once as in training
    t = time.perf_counter()
    captions = demo_data.class_captions()
    n_lens = min(cfg["lens_images"], cfg["test"])
    for seed, seed_runs in runs.items():
        print(f"[demo] 4/5 evaluate seed {seed}: {cfg['test']} held-out images x 10 candidate captions, "
              f"lens on {n_lens}, captions of {len(json.loads(Path(data['photos']).read_text()))} photos + 4 test images",
              flush=True)
        kwargs = {arm: dict(run_dir=run["dir"], model_base=paths["lm"], data=data, captions=captions,
                            n_test=cfg["test"], n_lens=n_lens, progress=False) for arm, run in seed_runs.items()}
        results = {}
        for arm, run in seed_runs.items():  # an unchanged evaluation of an unchanged run is reused
            key = {**kwargs[arm], "trained": run.get("finished_at"), "format": EVAL_FORMAT}
            path = Path(run["dir"], "eval.json")
            if path.is_file():
                try:
                    old = json.loads(path.read_text())
                except ValueError:
                    old = {}
                if old.get("key") == json.loads(json.dumps(key)):
                    results[arm] = old
        todo = {arm: kw for arm, kw in kwargs.items() if arm not in results}
        if len(todo) < len(kwargs):
            print(f"[demo]     reused the evaluation of: {', '.join(a for a in kwargs if a not in todo)}", flush=True)
        if todo:
            workers = min(cores, len(todo)) if parallel else 1
            results.update(evaluate_arms(todo, workers=workers, threads=max(1, cores // workers), progress=progress,
                                         seed=seed))
        for arm, run in seed_runs.items():
            results[arm]["key"] = {**kwargs[arm], "trained": run.get("finished_at"), "format": EVAL_FORMAT}
            Path(run["dir"], "eval.json").write_text(json.dumps(results[arm]))
            run["eval"] = results[arm]
    timings["evaluate"] = time.perf_counter() - t

    # 5. report
    print("[demo] 5/5 report", flush=True)
    t = time.perf_counter()
    timings["total_before_report"] = time.perf_counter() - t0
    summary = write_report(out, runs, cfg=cfg, data=data, paths=paths, timings=timings, arms=arms, tiny=args.tiny)
    timings["report"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    print(summary["line"].replace("{total}", f"{total / 60:.1f} min"), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
