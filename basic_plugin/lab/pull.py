"""How hard each of BASIC's terms pulls the projector, next to the caption loss: per-term gradients.

At a trained projector and a few of its training batches (captions tokenized with LLaVA's own
``plain`` preprocessing, images through LLaVA's ``process_images``), the gradient of the
training loss with respect to the projector's parameters is taken three times through the
plugin forward: the caption loss alone (both lambdas 0), plus ``lambda_das * L_das``, plus
``lambda_sds * L_sds``. A term's gradient is the difference from the first. Reported per run:

* ``norm_lm``, ``norm_das``, ``norm_sds``: the gradient norms (mean over the batches' gradients);
* ``das_over_lm``, ``sds_over_lm``: each term's norm over the caption loss's;
* ``cos_das_lm``, ``cos_sds_lm``: the cosine between a term's gradient and the caption loss's
  (negative: the term pulls the projector against what the caption loss asks for);
* ``das_top_share`` / ``lm_top_share``: the part of each gradient's squared norm (output layer
  of the projector) that lands on the refined target's ``top`` channels (of ``d``: about
  ``top / d`` for a spread-out gradient), i.e. whether the pull is into those channels;
* ``massive_channels`` (what ``--basic_drop_channels auto`` finds in the LLM) and
  ``das_massive_share`` / ``lm_massive_share``: the same for those channels;
* ``das_gradient_top`` / ``das_gradient_top_share``: where the direction term's pull goes, its
  ``top`` output channels by gradient energy and their part of it (with a target variant: where
  the pull went instead).

The weights are the paper's unless ``--basic-flags`` says otherwise; a monitor-only run can so
be asked how hard BASIC would pull it. docs/RESULTS.md (the mechanism) reads the numbers.

    python -m basic_plugin.lab.pull --model-path RUN --model-base LLM --data TRAIN_JSON --image-folder DIR
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import types
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence

from basic_plugin.host.refusal import print_refusal


def caption_batch(records: Sequence[dict], tokenizer, image_processor, model_config, image_folder) -> dict:
    """A training batch of pretraining records as LLaVA's ``plain`` preprocessing and collator build it."""
    import torch
    from llava import conversation as conversation_lib
    from llava.train.train import preprocess_plain

    from basic_plugin.lab.lens import pixel_batch

    saved = conversation_lib.default_conversation
    conversation_lib.default_conversation = conversation_lib.conv_templates["plain"]
    try:
        tokens = preprocess_plain([copy.deepcopy(r["conversations"]) for r in records], tokenizer)
    finally:
        conversation_lib.default_conversation = saved
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(ids) for ids in tokens["input_ids"])
    input_ids = torch.full((len(records), width), pad, dtype=torch.long)
    labels = torch.full((len(records), width), -100, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.bool)
    for b, (ids, lab) in enumerate(zip(tokens["input_ids"], tokens["labels"])):
        input_ids[b, :len(ids)], labels[b, :len(lab)], mask[b, :len(ids)] = ids, lab, True
    images = pixel_batch([Path(image_folder) / r["image"] for r in records], image_processor, model_config)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "images": images}


def bind_basic(model, *, lambda_das: float, lambda_sds: float, overrides: Optional[dict] = None, tokenizer=None):
    """Bind BASIC (stage 1, ``overrides`` of its flags) to ``model`` as the host does for a training run
    (``tokenizer``: for ``--basic_drop_channels``, whose probe needs it)."""
    from basic_plugin.basic import plugin as basic
    from basic_plugin.basic.arguments import BasicArguments
    from basic_plugin.host.binding import bind

    args = {**asdict(BasicArguments()), **(overrides or {}), "basic": True, "basic_lambda_das": lambda_das,
            "basic_lambda_sds": lambda_sds, "tune_mm_mlp_adapter": True}
    objective = basic.llava_objective(model=model, tokenizer=tokenizer, training_args=types.SimpleNamespace(**args),
                                      data_args=None)
    bind(model, [objective])


def projector_gradient(model, batches: Sequence[dict]) -> List:
    """Mean over ``batches`` of the gradient of the model's training loss w.r.t. the projector's parameters."""
    import torch

    params = list(model.get_model().mm_projector.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for batch in batches:
        loss = model(**batch).loss
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g.double() / len(batches)
    return total


def term_gradients(model, batches: Sequence[dict], *, lambda_das: float, lambda_sds: float,
                   overrides: Optional[dict] = None, tokenizer=None) -> dict:
    """``{"lm", "das", "sds"}``: each a list of the projector parameters' gradients (float64, in
    ``parameters()`` order) of the caption loss and of each of BASIC's terms as added to it."""
    from basic_plugin.host.binding import bind

    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad_(True)
    model.train()
    grads = {}
    try:
        for name, das, sds in (("lm", 0.0, 0.0), ("das", lambda_das, 0.0), ("sds", 0.0, lambda_sds)):
            bind_basic(model, lambda_das=das, lambda_sds=sds, overrides=overrides, tokenizer=tokenizer)
            grads[name] = projector_gradient(model, batches)
    finally:
        bind(model, [])
    for name in ("das", "sds"):
        grads[name] = [g - g0 for g, g0 in zip(grads[name], grads["lm"])]
    return grads


def refined_top_channels(model, batches: Sequence[dict], depth: int, top: int) -> List[int]:
    """The ``top`` channels holding most of the refined target's squared norm over the batches' image tokens."""
    import torch

    from basic_plugin.basic.losses import refined_target
    from basic_plugin.basic.target import target_layers

    energy = None
    with torch.no_grad():
        for batch in batches:
            rows, hidden = image_rows_and_states(model, batch)
            vhat = refined_target([hidden[l][rows] for l in target_layers(depth)]).double()
            energy = vhat.pow(2).sum(0) if energy is None else energy + vhat.pow(2).sum(0)
    return torch.topk(energy, top).indices.tolist()


def image_rows_and_states(model, batch: dict):
    """``(rows, hidden_states)``: LLaVA's spliced sequence for ``batch`` through the LLM (no plugin),
    and the (B, width) mask of its image rows (one image per sample, where its ``<image>`` was)."""
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX

    _, _, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"])
    hidden = model.get_model()(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True,
                               use_cache=False, return_dict=True).hidden_states
    n_tokens = embeds.shape[1] - batch["input_ids"].shape[1] + 1  # the widest sample sets the width
    rows = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    for b, ids in enumerate(batch["input_ids"]):
        at = (ids == IMAGE_TOKEN_INDEX).nonzero()
        if len(at) != 1:
            raise ValueError(f"sample {b}: needs exactly one <image> placeholder, found {len(at)}")
        rows[b, int(at[0]):int(at[0]) + n_tokens] = True
    return rows, hidden


def pulls(model, batches: Sequence[dict], *, lambda_das: float, lambda_sds: float, overrides: Optional[dict] = None,
          top: int = 5, tokenizer=None) -> dict:
    """The statistics above for one model (float64 on the gradients); the massive channels need ``tokenizer``."""
    import torch

    from basic_plugin.basic.target import default_depth

    grads = term_gradients(model, batches, lambda_das=lambda_das, lambda_sds=lambda_sds, overrides=overrides,
                           tokenizer=tokenizer)
    depth = int((overrides or {}).get("basic_depth") or default_depth(model.config.num_hidden_layers))
    channels = refined_top_channels(model, batches, depth, top)
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    out_layer = {k: v[-2:] for k, v in grads.items()}  # the projector's last Linear: weight rows, bias

    def energy(parts):  # per output channel
        return sum(p.pow(2).reshape(p.shape[0], -1).sum(1) for p in parts)

    def top_share(parts, chosen=channels):
        e = energy(parts)
        return (e[list(chosen)].sum() / e.sum().clamp_min(1e-300)).item() if len(chosen) else 0.0

    massive = []
    if tokenizer is not None:
        from basic_plugin.basic.channels import find_massive_channels

        massive = find_massive_channels(model, tokenizer, depth, "auto")["channels"]
    das_energy = energy(out_layer["das"])
    das_top = torch.topk(das_energy, top).indices.tolist()

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-300).item()

    norms = {k: v.norm().item() for k, v in flat.items()}
    return {"norm_lm": norms["lm"], "norm_das": norms["das"], "norm_sds": norms["sds"],
            "das_over_lm": norms["das"] / max(norms["lm"], 1e-300), "sds_over_lm": norms["sds"] / max(norms["lm"], 1e-300),
            "cos_das_lm": cos(flat["das"], flat["lm"]), "cos_sds_lm": cos(flat["sds"], flat["lm"]),
            "top_channels": channels, "das_top_share": top_share(out_layer["das"]),
            "lm_top_share": top_share(out_layer["lm"]), "massive_channels": massive,
            "das_massive_share": top_share(out_layer["das"], massive), "lm_massive_share": top_share(out_layer["lm"], massive),
            "das_gradient_top": das_top, "das_gradient_top_share": top_share(out_layer["das"], das_top),
            "channels": model.config.hidden_size,
            "lambda_das": lambda_das, "lambda_sds": lambda_sds, "depth": depth, "batches": len(batches),
            "batch_size": int(batches[0]["input_ids"].shape[0])}


def parse_basic_flags(text: str) -> dict:
    """``"--basic_depth 7 --basic_patch_weights uniform"`` -> ``{"basic_depth": 7, "basic_patch_weights": "uniform"}``."""
    from basic_plugin.basic.arguments import BasicArguments

    defaults, words, out = asdict(BasicArguments()), shlex.split(text), {}
    if len(words) % 2:
        raise ValueError(f"--basic-flags {text!r}: needs flag/value pairs")
    for flag, value in zip(words[::2], words[1::2]):
        key = flag.lstrip("-")
        if key not in defaults:
            raise ValueError(f"--basic-flags: unknown {flag}; allowed: {', '.join('--' + k for k in defaults)}")
        out[key] = _value(value)
    return out


def _value(text: str):
    """A flag's value as HfArgumentParser would read it for BASIC's fields: bool, int, float or text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from basic_plugin.basic.arguments import BasicArguments
    from basic_plugin.host.forward import with_plugin_forward
    from basic_plugin.lab.lens import load_llava

    p = argparse.ArgumentParser(prog="python -m basic_plugin.lab.pull", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, action="append", help="run folder(s) with mm_projector.bin")
    p.add_argument("--model-base", required=True, help="the base LLM folder")
    p.add_argument("--data", required=True, help="LLaVA pretraining json (the run's own captions)")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--basic-flags", default="", help='BASIC flags to measure with, e.g. "--basic_depth 7"; '
                                                     "lambdas: the paper's unless given")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        overrides = parse_basic_flags(args.basic_flags)
    except ValueError as err:
        return print_refusal(err)
    defaults = BasicArguments()
    lambda_das = overrides.pop("basic_lambda_das", defaults.basic_lambda_das)
    lambda_sds = overrides.pop("basic_lambda_sds", defaults.basic_lambda_sds)
    records = json.loads(Path(args.data).read_text())[:args.batches * args.batch_size]
    from llava.model import LlavaLlamaForCausalLM

    results = {}
    for path in args.model_path:
        torch.manual_seed(0)
        tokenizer, model, processor = load_llava(path, args.model_base,
                                                 model_class=with_plugin_forward(LlavaLlamaForCausalLM))
        batches = [caption_batch(records[i:i + args.batch_size], tokenizer, processor, model.config, args.image_folder)
                   for i in range(0, len(records), args.batch_size)]
        r = results[path] = pulls(model, batches, lambda_das=lambda_das, lambda_sds=lambda_sds, overrides=overrides,
                                  top=args.top, tokenizer=tokenizer)
        print(f"{path}: |g_lm| {r['norm_lm']:.4g}; lambda_das L_das: |g| {r['das_over_lm']:.2f}x, cos with g_lm "
              f"{r['cos_das_lm']:+.3f}, {100 * r['das_top_share']:.1f}% of its output-layer part on the target's "
              f"top-{args.top} channels (g_lm: {100 * r['lm_top_share']:.1f}%), "
              f"{100 * r['das_massive_share']:.1f}% on the LLM's massive channels {r['massive_channels']}, its own "
              f"top-{args.top} {r['das_gradient_top']} take {100 * r['das_gradient_top_share']:.1f}%; lambda_sds L_sds: |g| "
              f"{r['sds_over_lm']:.2f}x, cos {r['cos_sds_lm']:+.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
