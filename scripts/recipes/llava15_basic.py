#!/usr/bin/env python3
"""LLaVA-1.5 + BASIC on GPUs: pretrain (ZeRO-2), finetune (ZeRO-3), LoRA finetune, eval.

The training commands are LLaVA-1.5's own (scripts/v1_5/pretrain.sh, finetune.sh,
finetune_lora.sh at LLaVA c121f04: same data, hyperparameters, global batch), launched by
DeepSpeed, plus BASIC's flags. Multi-node through DeepSpeed's --hostfile. The eval step runs
LLaVA's unchanged scripts/v1_5/eval/*.sh from a LLaVA checkout ($LLAVA_DIR) on the trained
checkpoint. --dry-run prints every resolved command and runs nothing.

    python scripts/recipes/llava15_basic.py --size 7b --stage all --dry-run
    python scripts/recipes/llava15_basic.py --size 13b --stage pretrain,finetune \\
        --hostfile hostfile --num-gpus 8
    LLAVA_DIR=~/LLaVA python scripts/recipes/llava15_basic.py --size 7b --stage eval

Only the standard library is used, so any python3 runs it (the launched jobs need the
training environment: LLaVA, basic-llava, DeepSpeed, flash-attn for the default entry).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def _load_llava_args():
    """basic_plugin/lab/llava_args.py, loaded by path: standard library only, without the package's dependencies."""
    spec = importlib.util.spec_from_file_location("_basic_llava_llava_args",
                                                  REPO_ROOT / "basic_plugin" / "lab" / "llava_args.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llava_args = _load_llava_args()
CONFIGS = {**llava_args.DEEPSPEED_CONFIGS, "zero3_offload": HERE / "zero3_offload.json"}

STAGES = ("pretrain", "finetune", "lora", "eval")
ALL_STAGES = ("pretrain", "finetune", "eval")

#: Vicuna-v1.5 layer counts: BASIC's default depth is half of them (paper: 16 for 7B, 20 for 13B).
LLM_LAYERS = {"7b": 32, "13b": 40}

#: What LLaVA-1.5 trained with (8 GPUs): per-device batch x 8 x grad-accum 1.
GLOBAL_BATCH = {"pretrain": 256, "finetune": 128, "lora": 128}
PER_DEVICE_BATCH = {stage: int(flags["--per_device_train_batch_size"])
                    for stage, flags in llava_args.LLAVA15.items()}  # 32, 16, 16

#: Where each flag goes in a training command (the commands printed by --dry-run).
ORDER = (
    "--deepspeed", "--model_name_or_path", "--data_path", "--image_folder", "--pretrain_mm_mlp_adapter",
    "--lora_enable", "--lora_r", "--lora_alpha", "--mm_projector_lr", "--version", "--tune_mm_mlp_adapter",
    "--image_aspect_ratio", "--group_by_modality_length", "--save_steps", "--learning_rate", "--vision_tower",
    "--mm_projector_type", "--mm_vision_select_layer", "--mm_use_im_start_end", "--mm_use_im_patch_token", "--bf16",
    "--num_train_epochs", "--per_device_eval_batch_size", "--evaluation_strategy", "--save_strategy",
    "--save_total_limit", "--weight_decay", "--warmup_ratio", "--lr_scheduler_type", "--logging_steps", "--tf32",
    "--model_max_length", "--gradient_checkpointing", "--dataloader_num_workers", "--lazy_preprocess",
    "--output_dir", "--per_device_train_batch_size", "--gradient_accumulation_steps", "--report_to",
)

#: The BASIC paper's table (VQAv2, GQA, SQA-I, MMB-EN/CN, MM-Vet, VizWiz) plus TextVQA.
DEFAULT_BENCHMARKS = ("vqav2", "gqa", "sqa", "textvqa", "mmbench", "mmbench_cn", "mmvet", "vizwiz")
#: scripts/v1_5/eval/*.sh at LLaVA c121f04 that run without arguments (qbench needs a split).
KNOWN_BENCHMARKS = ("gqa", "llavabench", "mmbench", "mmbench_cn", "mme", "mmvet", "pope", "seed",
                    "sqa", "textvqa", "vizwiz", "vqav2")
#: Scripts that split the questions over the GPUs in CUDA_VISIBLE_DEVICES; the others use one GPU.
CHUNKED_BENCHMARKS = ("gqa", "seed", "vqav2")
#: The model id every LLaVA eval script loads, and the name its outputs carry (for 7B and 13B alike): the
#: eval workspace's copies of the scripts name the evaluated checkpoint instead (rewrite_eval_script).
EVAL_MODEL_ID = "liuhaotian/llava-v1.5-13b"
EVAL_MODEL_NAME = "llava-v1.5-13b"
#: Outputs the eval scripts write inside playground/data/eval/<bench>/: made fresh, never linked.
EVAL_OUTPUT_DIRS = ("answers", "answers_upload", "results", "reviews")
EVAL_OUTPUT_FILES = ("testdev_balanced_predictions.json",)
#: Directories (under playground/data/eval) the scripts write into: mirrored, not linked.
EVAL_WRITABLE_DIRS = ("gqa/data", "MME/eval_tool")


@dataclass
class Step:
    """One command of the recipe."""

    stage: str
    name: str
    argv: List[str]
    cwd: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    note: str = ""
    needs: List[str] = field(default_factory=list)  # files an earlier stage must have written

    def shell(self) -> str:
        parts = []
        if self.cwd:
            parts.append(f"cd {shlex.quote(self.cwd)} &&")
        parts += [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        parts.append(shlex.join(self.argv))
        return " ".join(parts)


def read_hostfile(path: Path) -> Dict[str, int]:
    """``host slots=N`` lines of a DeepSpeed hostfile (comments and blank lines ignored)."""
    hosts: Dict[str, int] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if not slots:
            raise SystemExit(f"hostfile {path}: line {raw!r} has no slots=N")
        hosts[parts[0]] = int(slots[0].split("=", 1)[1])
    if not hosts:
        raise SystemExit(f"hostfile {path} lists no hosts")
    return hosts


def world_size(args) -> int:
    """Ranks DeepSpeed's launcher will start (its own rules for --hostfile/--num_nodes/--num_gpus)."""
    if args.hostfile is None:
        return args.num_gpus or 8
    hosts = read_hostfile(Path(args.hostfile))
    slots = list(hosts.values())
    if args.num_nodes:
        slots = slots[: args.num_nodes]
    if args.num_gpus:  # the launcher then uses GPUs 0..N-1 on every host
        return len(slots) * args.num_gpus
    return sum(slots)


def launcher(args) -> List[str]:
    cmd = ["deepspeed"]
    if args.hostfile:
        cmd += ["--hostfile", str(args.hostfile)]
    if args.num_nodes:
        cmd += ["--num_nodes", str(args.num_nodes)]
    if args.num_gpus or not args.hostfile:
        cmd += ["--num_gpus", str(args.num_gpus or 8)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    cmd += ["--master_port", str(args.master_port)]
    if args.entry == "patched":  # LLaVA with patches/0001-plugin-hooks.patch: its own entry
        module = "llava.train.train_mem" if args.flash_attn else "llava.train.train"
    else:  # any LLaVA: basic-llava's runtime integration
        module = "basic_plugin.train_mem" if args.flash_attn else "basic_plugin.train"
    return cmd + ["--module", module]


def paths(args) -> Dict[str, str]:
    out = Path(args.output_root)
    run = args.run_name or (f"llava-v1.5-{args.size}" + ("" if args.no_basic else "-basic"))
    return {
        "pretrain": str(out / f"{run}-pretrain"),
        "finetune": str(out / run),
        "lora": str(out / f"{run}-lora"),
        "lora_merged": str(out / f"{run}-lora-merged"),
    }


def basic_flags(args) -> List[str]:
    if args.no_basic:
        return []
    depth = args.basic_depth or LLM_LAYERS[args.size] // 2
    return ["--basic", "True", "--basic_depth", str(depth),
            "--basic_lambda_das", str(args.basic_lambda_das),
            "--basic_lambda_sds", str(args.basic_lambda_sds)]


def train_step(args, stage: str) -> Step:
    where = paths(args)
    world = world_size(args)
    global_batch = args.global_batch or GLOBAL_BATCH[stage]
    per_device = args.per_device_batch or PER_DEVICE_BATCH[stage]
    while not args.per_device_batch and per_device > 1 and global_batch % (per_device * world):
        per_device //= 2  # more GPUs than LLaVA's 8: smaller per-device batch, same global batch
    if global_batch % (per_device * world):
        raise SystemExit(f"{stage}: global batch {global_batch} is not a multiple of {per_device} per "
                         f"device x {world} GPUs; set --per-device-batch or --global-batch")
    accum = global_batch // (per_device * world)
    if stage == "pretrain":
        config, data, images = "zero2", args.pretrain_data, args.pretrain_images
    else:
        config, data, images = ("zero3_offload" if args.offload else "zero3"), args.finetune_data, args.finetune_images
    adapter = None if stage == "pretrain" else str(Path(where["pretrain"]) / "mm_projector.bin")
    argv = launcher(args) + llava_args.llava15_args(
        stage, model=args.model or f"lmsys/vicuna-{args.size}-v1.5", data_path=data, image_folder=images,
        vision_tower=args.vision_tower, output_dir=where[stage], deepspeed=CONFIGS[config],
        pretrain_mm_mlp_adapter=adapter, order=ORDER,
        overrides={"--per_device_train_batch_size": per_device, "--gradient_accumulation_steps": accum,
                   "--report_to": args.report_to},
        extra=basic_flags(args) + shlex.split(args.extra_train_args or ""))
    note = (f"{stage}: {Path(CONFIGS[config]).name}, {world} GPUs, global batch {global_batch} = "
            f"{per_device} x {world} x {accum}")
    if args.hostfile:
        note += " (multi-node: list variables the ranks need, e.g. LLAVA_PLUGINS, in .deepspeed_env)"
    needs = [adapter] if adapter else []
    return Step(stage, f"train-{stage}", argv, note=note, needs=needs)


def eval_steps(args, stages) -> List[Step]:
    where = paths(args)
    if args.llava_dir:
        llava_dir = str(Path(args.llava_dir).resolve())
    elif args.dry_run:  # show the plan anyway
        llava_dir = "$LLAVA_DIR"
    else:
        raise SystemExit("eval needs a LLaVA checkout: --llava-dir or LLAVA_DIR")
    target = args.eval_model or ("lora" if "lora" in stages and "finetune" not in stages else "finetune")
    steps: List[Step] = []
    checkpoint = where["finetune"]
    if target == "lora":
        checkpoint = where["lora_merged"]
        steps.append(Step("eval", "merge-lora", [
            args.python, "scripts/merge_lora_weights.py", "--model-path", where["lora"],
            "--model-base", args.model or f"lmsys/vicuna-{args.size}-v1.5",
            "--save-model-path", checkpoint], cwd=llava_dir,
            note="LLaVA's eval scripts take one --model-path: merge the LoRA weights first",
            needs=[str(Path(where["lora"]) / "adapter_config.json")]))
    workdir = args.eval_workdir or str(Path(args.output_root) / "eval" / Path(checkpoint).name)
    steps.append(Step("eval", "workspace", [
        sys.executable, str(Path(__file__).resolve()), "--make-eval-workspace",
        "--llava-dir", llava_dir, "--eval-workdir", workdir, "--eval-checkpoint", str(Path(checkpoint).resolve())],
        note=(f"eval workspace {workdir}: LLaVA's scripts/v1_5/eval/*.sh with {EVAL_MODEL_ID} and "
              f"{EVAL_MODEL_NAME} replaced by the checkpoint ({eval_name(checkpoint)}), the rest of scripts/ and "
              f"llava/ -> $LLAVA_DIR, playground/data/eval mirrored with inputs linked and outputs local")))
    gpus = args.eval_gpus or ",".join(str(i) for i in range(args.num_gpus or 8))
    for bench in args.benchmarks:
        script = f"scripts/v1_5/eval/{bench}.sh"  # the workspace's copy, naming the checkpoint
        steps.append(Step("eval", f"eval-{bench}", ["bash", script], cwd=workdir,
                          env={"CUDA_VISIBLE_DEVICES": gpus if bench in CHUNKED_BENCHMARKS else gpus.split(",")[0]}))
    return steps


def plan(args) -> List[Step]:
    stages = []
    for s in args.stage.split(","):
        s = s.strip()
        if s == "all":
            stages += ALL_STAGES
        elif s in STAGES:
            stages.append(s)
        else:
            raise SystemExit(f"--stage {s!r}: allowed {', '.join(STAGES)}, all (= {','.join(ALL_STAGES)})")
    stages = [s for s in STAGES if s in stages]
    if args.offload and "lora" in stages:
        raise SystemExit("--offload applies to the full finetune only (ZeRO-3 offload uses DeepSpeed's "
                         "CPU Adam, which would drop LoRA's --mm_projector_lr)")
    steps = [train_step(args, s) for s in stages if s != "eval"]
    if "eval" in stages:
        steps += eval_steps(args, stages)
    return steps


# --------------------------------------------------------------------------- eval workspace

def eval_name(checkpoint) -> str:
    """The name a checkpoint's eval outputs carry: its folder's name (``checkpoint-N`` with its run's, as LLaVA's
    ``get_model_name_from_path`` does), in characters a script can hold unquoted."""
    path = Path(str(checkpoint).rstrip("/"))
    name = f"{path.parent.name}_{path.name}" if path.name.startswith("checkpoint-") else path.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def rewrite_eval_script(text: str, checkpoint) -> str:
    """One of LLaVA's ``scripts/v1_5/eval/*.sh`` for ``checkpoint``: its model id (``liuhaotian/llava-v1.5-13b``)
    becomes the checkpoint's path and every other ``llava-v1.5-13b`` (answer files, ``CKPT``, experiment
    names) its name, in one pass (a path that itself holds ``llava-v1.5-13b`` is not rewritten twice).
    Nothing else changes. The same as INTEGRATION.md's ``sed`` command."""
    path, name = shlex.quote(str(checkpoint)), eval_name(checkpoint)
    pattern = re.escape(EVAL_MODEL_ID) + "|" + re.escape(EVAL_MODEL_NAME)
    return re.sub(pattern, lambda m: path if m.group(0) == EVAL_MODEL_ID else name, text)


def make_eval_workspace(llava_dir: Path, workdir: Path, checkpoint: Path) -> None:
    """Lay out a folder where LLaVA's eval scripts evaluate ``checkpoint`` under its own name.

    The scripts run ``python -m llava.eval.* --model-path liuhaotian/llava-v1.5-13b`` on
    ``./playground/data/eval/...``, name their outputs ``llava-v1.5-13b`` and call
    ``scripts/*.py`` and ``llava/eval/*.py``: here ``scripts/v1_5/eval/*.sh`` are copies with
    the model id and name replaced by the checkpoint's (:func:`rewrite_eval_script`; a 7B
    model's answers are never labelled 13B), the rest of scripts/ and llava/ link to the
    checkout, and playground/data/eval mirrors the checkout's: folders the scripts write into
    are real, inputs are links, outputs (answers, uploads, results) stay in the workspace and
    never overwrite the checkout's.
    """
    src_eval = llava_dir / "playground" / "data" / "eval"
    if not src_eval.is_dir():
        raise SystemExit(f"{src_eval} is missing: unpack LLaVA's eval.zip there (docs/Evaluation.md)")
    workdir.mkdir(parents=True, exist_ok=True)

    def link(target: Path, at: Path) -> None:
        if at.is_symlink() or at.exists():
            if at.is_symlink() and at.resolve() == target.resolve():
                return
            if at.is_symlink():
                at.unlink()
            else:
                raise SystemExit(f"{at} exists and is not a link")
        at.parent.mkdir(parents=True, exist_ok=True)
        at.symlink_to(target)

    if (workdir / "scripts").is_symlink():  # a workspace laid out by an earlier version: scripts/ was one link
        (workdir / "scripts").unlink()
    for entry in sorted((llava_dir / "scripts").iterdir()):
        if entry.name != "v1_5":
            link(entry, workdir / "scripts" / entry.name)
    for entry in sorted((llava_dir / "scripts" / "v1_5").iterdir()):
        if entry.name != "eval":
            link(entry, workdir / "scripts" / "v1_5" / entry.name)
    scripts = workdir / "scripts" / "v1_5" / "eval"
    scripts.mkdir(parents=True, exist_ok=True)
    for script in sorted((llava_dir / "scripts" / "v1_5" / "eval").glob("*.sh")):
        (scripts / script.name).write_text(rewrite_eval_script(script.read_text(), checkpoint))
    link(llava_dir / "llava", workdir / "llava")

    def mirror(src: Path, dst: Path, rel: str) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        for entry in sorted(src.iterdir()):
            if entry.is_dir() and entry.name in EVAL_OUTPUT_DIRS:
                (dst / entry.name).mkdir(exist_ok=True)  # fresh: the scripts write here
            elif entry.name in EVAL_OUTPUT_FILES or entry.name.endswith("_answers.jsonl"):
                continue  # written by the scripts (GQA predictions, Q-Bench answers)
            elif entry.is_dir() and f"{rel}/{entry.name}" in EVAL_WRITABLE_DIRS:
                mirror(entry, dst / entry.name, f"{rel}/{entry.name}")
            else:
                link(entry, dst / entry.name)  # an input: questions, images, eval tools

    for bench in sorted(p for p in src_eval.iterdir() if p.is_dir()):
        dst = workdir / "playground" / "data" / "eval" / bench.name
        mirror(bench, dst, bench.name)
        for out in ("answers", "answers_upload"):  # not every script makes its output folder
            (dst / out).mkdir(exist_ok=True)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    # LLaVA's scripts read ./playground/data of the LLaVA checkout
    data = env("LLAVA_DATA") or (f"{env('LLAVA_DIR')}/playground/data" if env("LLAVA_DIR") else "./playground/data")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(LLM_LAYERS), help="Vicuna-v1.5 7B or 13B")
    p.add_argument("--stage", default="all",
                   help="comma-separated: pretrain, finetune, lora, eval; all = pretrain,finetune,eval")
    p.add_argument("--dry-run", action="store_true", help="print the resolved commands, run nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print the steps as JSON")
    g = p.add_argument_group("cluster")
    g.add_argument("--hostfile", default=env("HOSTFILE"), help="DeepSpeed hostfile ('host slots=N' lines)")
    g.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs per node (default 8 without --hostfile; the hostfile's slots with it)")
    g.add_argument("--num-nodes", type=int, default=None, help="use the first N hosts of the hostfile")
    g.add_argument("--master-addr", default=env("MASTER_ADDR"))
    g.add_argument("--master-port", type=int, default=int(env("MASTER_PORT", "29500")))
    g.add_argument("--per-device-batch", type=int, default=None,
                   help="per-GPU batch (default LLaVA's 32 / 16); the global batch is kept by grad accumulation")
    g.add_argument("--global-batch", type=int, default=None, help="default LLaVA's 256 (pretrain) / 128")
    g.add_argument("--offload", action="store_true", help="full finetune with ZeRO-3 CPU offload (zero3_offload.json)")
    g.add_argument("--entry", choices=("runtime", "patched"), default=env("BASIC_LLAVA_ENTRY", "runtime"),
                   help="runtime: basic_plugin.train_mem on any LLaVA; patched: llava.train.train_mem "
                        "of a LLaVA with patches/0001-plugin-hooks.patch")
    g.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                   help="train.py's default attention instead of train_mem.py's FlashAttention-2")
    d = p.add_argument_group("data and outputs (env: LLAVA_DATA, PRETRAIN_DATA, ..., OUTPUT_ROOT)")
    d.add_argument("--pretrain-data", default=env("PRETRAIN_DATA", f"{data}/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"))
    d.add_argument("--pretrain-images", default=env("PRETRAIN_IMAGES", f"{data}/LLaVA-Pretrain/images"))
    d.add_argument("--finetune-data", default=env("FINETUNE_DATA", f"{data}/llava_v1_5_mix665k.json"))
    d.add_argument("--finetune-images", default=env("FINETUNE_IMAGES", data))
    d.add_argument("--output-root", default=env("OUTPUT_ROOT", "./checkpoints"))
    d.add_argument("--run-name", default=None, help="default llava-v1.5-<size>-basic (llava-v1.5-<size> with --no-basic)")
    d.add_argument("--model", default=env("BASE_MODEL"), help="default lmsys/vicuna-<size>-v1.5")
    d.add_argument("--vision-tower", default=env("VISION_TOWER", "openai/clip-vit-large-patch14-336"))
    d.add_argument("--report-to", default=env("REPORT_TO", "wandb"))
    d.add_argument("--extra-train-args", default=env("EXTRA_TRAIN_ARGS", ""), help="appended to every training command")
    b = p.add_argument_group("BASIC")
    b.add_argument("--no-basic", action="store_true", help="the LLaVA-1.5 baseline with the same recipe")
    b.add_argument("--basic-depth", type=int, default=None, help="default half the LLM's layers (16 / 20)")
    b.add_argument("--basic-lambda-das", type=float, default=1.0)
    b.add_argument("--basic-lambda-sds", type=float, default=0.01)
    e = p.add_argument_group("eval (LLaVA's scripts/v1_5/eval/*.sh)")
    e.add_argument("--llava-dir", default=env("LLAVA_DIR"), help="LLaVA checkout with playground/data/eval")
    e.add_argument("--benchmarks", default=env("BENCHMARKS", ",".join(DEFAULT_BENCHMARKS)),
                   help=f"comma-separated, of: {', '.join(KNOWN_BENCHMARKS)}")
    e.add_argument("--eval-model", choices=("finetune", "lora"), default=None,
                   help="checkpoint to evaluate (default: lora when only lora is trained here)")
    e.add_argument("--eval-gpus", default=env("EVAL_GPUS"), help="CUDA_VISIBLE_DEVICES of the eval (default 0..num-gpus-1)")
    e.add_argument("--eval-workdir", default=env("EVAL_WORKDIR"), help="default <output-root>/eval/<name of the evaluated checkpoint>")
    e.add_argument("--python", default=env("RECIPE_PYTHON", "python"),
                   help="python of the LLaVA environment, for merging LoRA weights (default: python on PATH)")
    # internal: lay out the eval workspace (the 'workspace' step)
    p.add_argument("--make-eval-workspace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eval-checkpoint", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.make_eval_workspace:
        make_eval_workspace(Path(args.llava_dir), Path(args.eval_workdir), Path(args.eval_checkpoint))
        print(f"eval workspace ready: {args.eval_workdir}")
        return 0
    if args.size is None:
        raise SystemExit("--size 7b|13b is required")
    args.benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = sorted(set(args.benchmarks) - set(KNOWN_BENCHMARKS))
    if unknown:
        raise SystemExit(f"--benchmarks: unknown {unknown}; allowed: {', '.join(KNOWN_BENCHMARKS)}")
    for name in ("pretrain_data", "pretrain_images", "finetune_data", "finetune_images", "output_root",
                 "hostfile", "eval_workdir", "llava_dir"):
        if getattr(args, name):  # absolute: every node and every step sees the same paths
            setattr(args, name, os.path.abspath(os.path.expanduser(getattr(args, name))))
    steps = plan(args)
    if args.dry_run:
        if args.json:
            print(json.dumps([asdict(s) for s in steps], indent=1))
        else:
            for s in steps:
                print(f"# [{s.stage}] {s.name}" + (f": {s.note}" if s.note else ""))
                print(s.shell())
        return 0
    for s in steps:
        missing = [f for f in s.needs if not os.path.exists(f)]
        if missing:
            print(f"[recipe] {s.name}: missing {', '.join(missing)} (run the earlier stage first)", file=sys.stderr)
            return 2
        print(f"[recipe] {s.name}: {s.shell()}", flush=True)
        env = dict(os.environ, **s.env)
        rc = subprocess.call(s.argv, cwd=s.cwd, env=env)
        if rc != 0:
            print(f"[recipe] {s.name} failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
