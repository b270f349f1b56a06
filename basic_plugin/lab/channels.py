"""``basic-llava channels``: where BASIC's refined target keeps its energy, per layer and per token, before training.

Run it on your own LLM before training with BASIC: no projector and no image are needed. A
fixed English text (:data:`basic_plugin.basic.channels.PROBE_TEXT`) runs through the LLM's first
k decoder layers, and the report says

* per layer l = 1..k: the channels with the largest mean |h| (as multiples of the median
  channel's: the statistic ``--basic_drop_channels`` uses), the part of each token's squared norm
  they hold, and the "sink" tokens (norm above 10x the median token's, where massive activations
  live in LLaMA-2/Vicuna);
* for the target itself (the l^2-weighted mean of layers 1..k): its top channels, what
  ``--basic_drop_channels auto`` would drop and why, and how concentrated each candidate target
  is (the part of a token's squared norm in its top 5 channels, per token and pooled; a target
  spread evenly over d channels gives 5/d): the paper's, with the channels dropped, standardised
  per channel (``--basic_standardize_target``), and as the LLM reads it (each layer's state after
  the RMSNorm of the layer that reads it; measured only, not a flag).

With ``--images`` the same is computed on image tokens: of trained stage-1 runs (``--runs``, the
projector in each run folder), or of LLaVA's initial projector (``--vision-tower``, seed 0), and for
trained runs also how much of v (the projector output) sits in the target's top channels and
cos(v, vhat) with and without them (docs/RESULTS.md, the mechanism).

    basic-llava channels --llm LLM [--depth K] [--runs RUN ... | --vision-tower TOWER] [--images DIR ...]

Writes ``--json`` and ``--plot`` when asked (default plot: ``channels.png`` in the working folder).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from basic_plugin.host.refusal import print_refusal
from basic_plugin.host.usage import CommandParser

TOP = 5
SINK_RATIO = 10.0


def channel_shares(v, vhat, top: int = TOP) -> dict:
    """v against vhat for matching ``(N, d)`` rows: vhat's ``top`` channels (over all tokens), the part of
    each one's squared norm there, cos(v, vhat) with all channels and without those (float64 inside)."""
    import torch

    v, vhat = v.detach().double(), vhat.detach().double()
    if v.shape != vhat.shape or v.dim() != 2:
        raise ValueError(f"v and vhat must be matching (N, d) rows; got {tuple(v.shape)} and {tuple(vhat.shape)}")
    energy = vhat.pow(2).sum(0)
    top_idx = torch.topk(energy, top).indices
    keep = torch.ones(v.shape[1], dtype=torch.bool)
    keep[top_idx] = False

    def share(x):
        return (x[:, top_idx].pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-300)).mean().item()

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean().item()

    return {"top_channels": top_idx.tolist(), "vhat_share": share(vhat), "v_share": share(v), "cos": cos(v, vhat),
            "cos_without_top": cos(v[:, keep], vhat[:, keep]), "v_norm": v.norm(dim=1).mean().item(),
            "vhat_norm": vhat.norm(dim=1).mean().item(), "tokens": v.shape[0], "channels": v.shape[1]}


def concentration(x, top: int = TOP) -> dict:
    """How concentrated rows ``x`` (N, d) are: the part of each row's squared norm in its own ``top`` channels
    (mean and 10/50/90% quantiles over rows), and of the pooled squared norm in the pooled top channels."""
    import torch

    x = x.detach().double()
    sq = x.pow(2)
    per_row = sq.topk(top, dim=1).values.sum(1) / sq.sum(1).clamp_min(1e-300)
    pooled = sq.sum(0)
    q = torch.quantile(per_row, torch.tensor([0.1, 0.5, 0.9], dtype=per_row.dtype)).tolist()
    return {"per_token": float(per_row.mean()), "per_token_q10_q50_q90": q,
            "pooled": float(pooled.topk(top).values.sum() / pooled.sum().clamp_min(1e-300)),
            "pooled_channels": pooled.topk(top).indices.tolist(), "uniform": top / x.shape[1]}


def sink_tokens(h, ratio: float = SINK_RATIO) -> List[int]:
    """Positions of rows whose norm is above ``ratio`` times the median row norm."""
    norms = h.detach().double().norm(dim=-1)
    return [int(i) for i in (norms > ratio * norms.median()).nonzero().flatten()]


def layer_rows(states, top: int = TOP) -> List[dict]:
    """Per layer l = 1..k: the top channels by mean |h| over the median channel's, their share per token, sinks."""
    import torch

    from basic_plugin.basic.channels import channel_statistic

    rows = []
    for layer, h in enumerate(states, start=1):
        h = h.reshape(-1, h.shape[-1]).double()
        ratio = channel_statistic([h])
        best = torch.argsort(ratio, descending=True)[:top].tolist()
        sq = h.pow(2)
        share = (sq[:, best].sum(1) / sq.sum(1).clamp_min(1e-300))
        rows.append({"layer": layer, "channels": best, "ratios": [float(ratio[c]) for c in best],
                     "share_per_token": float(share.mean()), "sinks": sink_tokens(h)})
    return rows


def read_as_the_llm(model, states) -> "torch.Tensor":
    """sum_l w_l RMSNorm_l(h_l): each layer's state after the input norm of the layer that reads it."""
    from basic_plugin.basic.target import target_weights

    layers = model.get_model().layers
    weights = target_weights(len(states))
    return sum(w * layers[l].input_layernorm(h.to(layers[l].input_layernorm.weight.dtype)).double()
               for l, (w, h) in enumerate(zip(weights, states), start=1))


def candidates(model, states, dropped: Sequence[int], top: int = TOP) -> Dict[str, dict]:
    """Concentration of each candidate target for the token states ``states`` ([h_1..h_k], each (N, d))."""
    from basic_plugin.basic.channels import standardize_rows
    from basic_plugin.basic.losses import refined_target

    vhat = refined_target([h.double() for h in states])
    out = {"paper": concentration(vhat, top)}
    if dropped:
        kept = vhat.clone()
        kept[:, list(dropped)] = 0
        out["drop"] = concentration(kept, top)
    out["standardize"] = concentration(standardize_rows(vhat), top)
    out["llm_read"] = concentration(read_as_the_llm(model, states), top)
    return out


def text_report(model, tokenizer, depth: int, drop: str, top: int = TOP) -> dict:
    from basic_plugin.basic.channels import (channel_statistic, choose_channels, energy_share, probe_ids,
                                             probe_states)
    from basic_plugin.basic.losses import refined_target

    states = [h[0] for h in probe_states(model, probe_ids(tokenizer), depth)]
    statistic = channel_statistic(states)
    dropped = choose_channels(statistic, drop)
    vhat = refined_target([h.double() for h in states])
    return {"tokens": int(states[0].shape[0]), "layers": layer_rows(states, top),
            "drop": {"spec": drop, "channels": dropped, "ratios": [float(statistic[c]) for c in dropped],
                     "target_share": energy_share(vhat, dropped)},
            "target_sinks": sink_tokens(vhat), "candidates": candidates(model, states, dropped, top)}


def image_token_states(model, tokenizer, image_processor, files, depth: int, batch: int = 8):
    """``(v, vhat)``: all image tokens of ``files`` at the LLM input and BASIC's refined target there."""
    v, states = image_states(model, tokenizer, image_processor, files, depth, batch)
    from basic_plugin.basic.losses import refined_target

    return v, refined_target(states)


def image_states(model, tokenizer, image_processor, files, depth: int, batch: int = 8):
    """``(v, [h_1..h_k])`` at the image tokens of ``files`` (each ``(N, d)``), as the plain template feeds them."""
    import torch

    from basic_plugin.lab.lens import pixel_batch, prefix_embeds

    vs, per_layer = [], [[] for _ in range(depth)]
    with torch.no_grad():
        for start in range(0, len(files), batch):
            pixels = pixel_batch(files[start:start + batch], image_processor, model.config)
            embeds, mask = prefix_embeds(model, tokenizer, pixels)
            out = model.get_model()(inputs_embeds=embeds, output_hidden_states=True, use_cache=False, return_dict=True)
            vs.append(out.hidden_states[0][mask])
            for l in range(depth):
                per_layer[l].append(out.hidden_states[l + 1][mask])
    return torch.cat(vs), [torch.cat(x) for x in per_layer]


def initial_llava(llm: str, vision_tower: str):
    """``(tokenizer, model, image_processor)``: the LLM with ``vision_tower`` and LLaVA's initial (seed 0)
    ``mlp2x_gelu`` projector, as stage 1 starts."""
    import types

    import torch
    from transformers import AutoTokenizer

    from basic_plugin.lab.towers import apply_lab_host

    apply_lab_host()
    from llava.model import LlavaLlamaForCausalLM
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(llm, use_fast=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = LlavaLlamaForCausalLM.from_pretrained(llm, torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    torch.manual_seed(0)
    margs = types.SimpleNamespace(vision_tower=vision_tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                  pretrain_mm_mlp_adapter=None, mm_projector_type="mlp2x_gelu",
                                  mm_patch_merge_type="flat")
    model.get_model().initialize_vision_modules(model_args=margs)
    model.eval()
    return tokenizer, model, model.get_vision_tower().image_processor


def image_report(model, tokenizer, processor, files, depth: int, dropped: Sequence[int], top: int = TOP) -> dict:
    from basic_plugin.basic.channels import energy_share
    from basic_plugin.basic.losses import refined_target

    v, states = image_states(model, tokenizer, processor, files, depth)
    vhat = refined_target([h.double() for h in states])
    return {"images": len(files), **channel_shares(v, vhat, top), "v_share_in_dropped": energy_share(v, dropped),
            "target_share_in_dropped": energy_share(vhat, dropped), "target_sinks": len(sink_tokens(vhat)),
            "candidates": candidates(model, states, dropped, top)}


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser("channels", description=__doc__.splitlines()[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--llm", required=True, help="the LLM folder (a Hugging Face Llama/Mistral checkpoint)")
    p.add_argument("--depth", type=int, default=None, help="target depth k (default: half the LLM's layers)")
    p.add_argument("--drop", default="auto", help="what --basic_drop_channels would get: auto (default) or N")
    p.add_argument("--top", type=int, default=TOP, help=f"channels counted as the top (default {TOP})")
    p.add_argument("--runs", nargs="+", default=[], help="stage-1 run folders (mm_projector.bin): their image tokens")
    p.add_argument("--vision-tower", default=None, help="a vision tower: image tokens of LLaVA's initial projector")
    p.add_argument("--images", nargs="+", default=[], help="image files or folders (with --runs or --vision-tower)")
    p.add_argument("--max-images", type=int, default=30, help="images read at most (default 30)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--plot", default="channels.png", help="the figure (default channels.png; '' for none)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basic_plugin.lab.argv import strip_separator

    args = build_parser().parse_args(strip_separator(argv))
    llm = Path(args.llm)
    if not (llm / "config.json").is_file():
        return print_refusal(f"--llm {args.llm}: no config.json there; allowed: a Hugging Face LLM folder")
    drop = args.drop.strip()
    if drop != "auto" and not drop.isdigit():
        return print_refusal(f"--drop {args.drop!r} is invalid; allowed: auto or an integer N >= 0")
    if (args.runs or args.vision_tower) and not args.images:
        return print_refusal("--images: none given; allowed: image files or folders (needed with --runs/--vision-tower)")
    import torch

    from basic_plugin.basic.target import default_depth, depth_range, valid_depth

    layers = json.loads((llm / "config.json").read_text())["num_hidden_layers"]
    depth = args.depth or default_depth(layers)
    if not valid_depth(depth, layers):
        return print_refusal(f"--depth {depth} is out of range; allowed: {depth_range(layers)}")
    with torch.no_grad():  # not set_grad_enabled(False): the caller's process keeps its gradients
        report = _report(args, llm, depth, drop)
    print(text(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def _report(args, llm: Path, depth: int, drop: str) -> dict:
    """The text probe's report, and the images' for ``--vision-tower`` / ``--runs`` (no gradients needed)."""
    from basic_plugin.lab.lens import load_images, load_llava

    if args.vision_tower or not args.runs:
        tokenizer, model, processor = initial_llava(str(llm), args.vision_tower) if args.vision_tower else \
            (*_llm_only(llm), None)
    else:
        tokenizer, model, processor = load_llava(args.runs[0], str(llm))
    report = {"llm": str(llm), "depth": depth, "top": args.top, "text": text_report(model, tokenizer, depth, drop, args.top)}
    dropped = report["text"]["drop"]["channels"]
    files = load_images(args.images, args.max_images) if args.images else []
    if files and args.vision_tower:
        report["images"] = {"initial projector": image_report(model, tokenizer, processor, files, depth, dropped, args.top)}
    if files and args.runs:
        report.setdefault("images", {})
        for run in args.runs:
            tokenizer, model, processor = load_llava(run, str(llm))
            report["images"][run] = image_report(model, tokenizer, processor, files, depth, dropped, args.top)
    return report


def _llm_only(llm: Path):
    """The LLM as a LLaVA model without vision modules (the text probe needs no more)."""
    import torch
    from transformers import AutoTokenizer

    from basic_plugin.lab.towers import apply_lab_host

    apply_lab_host()
    from llava.model import LlavaLlamaForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = LlavaLlamaForCausalLM.from_pretrained(str(llm), torch_dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    return AutoTokenizer.from_pretrained(str(llm), use_fast=False), model


NAMES = {"paper": "the paper's target", "drop": "channels dropped", "standardize": "standardised per channel",
         "llm_read": "as the LLM reads it (RMSNorm)"}


def _cands(c: Dict[str, dict]) -> List[str]:
    return [f"    {NAMES[k]:<32} {100 * v['per_token']:5.1f}% per token (10/50/90%: "
            + "/".join(f"{100 * q:.0f}" for q in v["per_token_q10_q50_q90"])
            + f"), {100 * v['pooled']:5.1f}% pooled in {v['pooled_channels']}" for k, v in c.items()]


def text(report: dict) -> str:
    t = report["text"]
    top = report["top"]
    lines = [f"{report['llm']}: a {t['tokens']}-token text probe through layers 1..{report['depth']} "
             f"(statistic: mean |h| over the median channel's)", "",
             f"layer  top {top} channels (statistic)" + " " * 40 + "their share  sink tokens"]
    for r in t["layers"]:
        chans = ", ".join(f"{c} ({x:.1f}x)" for c, x in zip(r["channels"], r["ratios"]))
        lines.append(f"{r['layer']:>5}  {chans:<68} {100 * r['share_per_token']:5.1f}%  {r['sinks'] or '-'}")
    d = t["drop"]
    lines += ["", f"--basic_drop_channels {d['spec']} would drop: " + (
        ", ".join(f"{c} ({x:.1f}x)" for c, x in zip(d["channels"], d["ratios"])) +
        f" ({100 * d['target_share']:.1f}% of the target's squared norm)" if d["channels"] else "nothing"),
        "", f"concentration of the target (share of a token's squared norm in its top {top} channels; "
            f"even spread: {100 * next(iter(t['candidates'].values()))['uniform']:.1f}%), text probe:"]
    lines += _cands(t["candidates"])
    for name, r in report.get("images", {}).items():
        lines += ["", f"image tokens, {name} ({r['images']} images, {r['tokens']} tokens, {r['target_sinks']} sink "
                      f"tokens): v holds {100 * r['v_share_in_dropped']:.1f}% of its squared norm in the dropped "
                      f"channels (the target {100 * r['target_share_in_dropped']:.1f}%); cos(v, vhat) {r['cos']:.3f}, "
                      f"without vhat's top {top} {r['cos_without_top']:.3f}"]
        lines += _cands(r["candidates"])
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    from basic_plugin.lab.plots import save, subplots

    t = report["text"]
    fig, (a, b) = subplots(1, 2, figsize=(11, 3.8))
    shown = []
    for r in t["layers"]:
        for c in r["channels"][:3]:
            if c not in shown:
                shown.append(c)
    for c in shown[:8]:
        ys = [r["ratios"][r["channels"].index(c)] if c in r["channels"] else float("nan") for r in t["layers"]]
        a.plot([r["layer"] for r in t["layers"]], ys, marker="o", ms=3, label=f"channel {c}")
    a.axhline(10, color="C3", ls="--", lw=1, label="auto: 10x")
    a.set_yscale("log")
    a.set_xlabel("layer")
    a.set_ylabel("mean |h| / median channel's")
    a.set_title("the LLM's heaviest channels (text probe)", fontsize=10)
    a.legend(fontsize=7)
    sets = {"text probe": t["candidates"], **{k: v["candidates"] for k, v in report.get("images", {}).items()}}
    keys = list(t["candidates"])
    width = 0.8 / len(sets)
    for i, (name, cands) in enumerate(sets.items()):
        b.bar([j + i * width for j in range(len(keys))], [100 * cands[k]["per_token"] if k in cands else 0 for k in keys],
              width, label="/".join(name.rstrip("/").split("/")[-2:]))  # a run folder: its last two parts
    b.axhline(100 * next(iter(t["candidates"].values()))["uniform"], color="0.5", ls=":", lw=1, label="even spread")
    b.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(keys))], [NAMES[k].split(" (")[0] for k in keys],
                  rotation=15, ha="right", fontsize=8)
    b.set_ylabel(f"% of a token's squared norm in its top {report['top']}")
    b.set_title(f"how concentrated the target is (depth {report['depth']})", fontsize=10)
    b.legend(fontsize=7)
    save(fig, path, dpi=110)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
