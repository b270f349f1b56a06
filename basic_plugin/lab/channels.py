"""Where BASIC's direction term points the projector: the refined target's dominant channels.

For a trained projector and some images, the image tokens at the LLM input (``v``, what the
projector gives) and BASIC's refined target at the same positions (``vhat``, the l^2-weighted
mean of decoder layers 1..k) are compared channel by channel:

* ``top_channels``: the ``top`` channels holding most of vhat's squared norm (over all tokens);
* ``vhat_share`` / ``v_share``: the part of each one's squared norm in those channels
  (for a spread-out vector: about ``top / d``);
* ``cos`` and ``cos_without_top``: the mean cos(v, vhat) per token, with all channels and with
  the top ones removed from both, i.e. how much of the alignment sits in those few channels.

A direction loss on a target whose norm lives in a few "massive activation" channels rewards a
projector that writes into exactly those channels (docs/RESULTS.md, the mechanism).

    python -m basic_plugin.lab.channels --model-path RUN --model-base LLM --images DIR [--depth K]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def channel_shares(v, vhat, top: int = 5) -> dict:
    """The statistics above for matching ``(N, d)`` rows of ``v`` and ``vhat`` (float64 inside)."""
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


def image_token_states(model, tokenizer, image_processor, files, depth: int, batch: int = 8):
    """``(v, vhat)``: all image tokens of ``files`` at the LLM input and BASIC's refined target there."""
    import torch

    from basic_plugin.basic.losses import refined_target
    from basic_plugin.basic.target import target_layers
    from basic_plugin.lab.lens import pixel_batch, prefix_embeds

    vs, targets = [], []
    with torch.no_grad():
        for start in range(0, len(files), batch):
            pixels = pixel_batch(files[start:start + batch], image_processor, model.config)
            embeds, mask = prefix_embeds(model, tokenizer, pixels)
            out = model.get_model()(inputs_embeds=embeds, output_hidden_states=True, use_cache=False, return_dict=True)
            vs.append(out.hidden_states[0][mask])
            targets.append(refined_target([out.hidden_states[l][mask] for l in target_layers(depth)]))
    return torch.cat(vs), torch.cat(targets)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from basic_plugin.basic.target import default_depth
    from basic_plugin.lab.lens import load_images, load_llava

    p = argparse.ArgumentParser(prog="python -m basic_plugin.lab.channels", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, action="append", help="run folder(s) with mm_projector.bin")
    p.add_argument("--model-base", required=True, help="the base LLM folder")
    p.add_argument("--images", required=True, nargs="+")
    p.add_argument("--max-images", type=int, default=30)
    p.add_argument("--depth", type=int, default=None, help="target depth k (default: half the layers)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    files = load_images(args.images, args.max_images)
    results = {}
    for path in args.model_path:
        tokenizer, model, processor = load_llava(path, args.model_base)
        depth = args.depth or default_depth(model.config.num_hidden_layers)
        v, vhat = image_token_states(model, tokenizer, processor, files, depth)
        results[path] = {"depth": depth, "images": len(files), **channel_shares(v, vhat, args.top)}
        r = results[path]
        print(f"{path}: top-{args.top} channels of vhat {r['top_channels']}: {100 * r['vhat_share']:.1f}% of vhat's "
              f"squared norm, {100 * r['v_share']:.1f}% of v's; cos(v, vhat) {r['cos']:.3f}, without them "
              f"{r['cos_without_top']:.3f}; |v| {r['v_norm']:.1f}, |vhat| {r['vhat_norm']:.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
