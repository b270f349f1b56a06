"""``basic-llava lens``: which vocabulary words do a LLaVA model's image tokens look like, layer by layer?

BASIC's analysis (ICCV 2025, section 3): take the image tokens' states at the LLM input
(layer 0, the projector output) and after each decoder layer, find for each the nearest
row of the input embedding matrix by cosine similarity, and count how many of those nearest
tokens are *meaningful words*. The paper reports about 74 of 576 image tokens for LLaVA-1.5-7B
at the input, about 217 after BASIC, and meaningful matches peaking in the shallow half of
the LLM, which is why BASIC supervises with layers 1..L/2 (``--basic_depth``).

A token is a **meaningful word** here when all of these hold (:func:`is_meaningful_word` on
:func:`token_text`):

* it is not a special token (``tokenizer.all_special_ids``);
* it starts a word: its vocabulary piece begins with the word-start marker (``Ġ`` in
  byte-level BPE such as SmolLM2's, ``▁`` in SentencePiece such as Llama/Vicuna's), so
  continuation pieces ("monary", "rizes") never count;
* the rest of the piece is ASCII letters only, at least 3 of them (so no digits,
  punctuation, code pieces like "()" or "_id", whitespace runs, byte pieces ``<0x..>`` or
  byte-level pieces of non-ASCII text);
* its lower case is not an English stop word (:data:`STOP_WORDS`).

So " shirt", " Dress", " boots" count; " the", " of", " ab", "shirt" (a continuation piece),
" 123", "()" do not.

Layer l means ``hidden_states[l]`` of transformers' ``output_hidden_states``: 0 is the input
embedding (image rows = projector output), l = 1..L-1 the output of decoder layer l, and
L the output of the last layer *after the final norm* (that is how transformers returns it).
Image-token states depend only on the tokens before them (causal attention), so the prompt
is ``[BOS] + --prefix-text + <image>`` and nothing after the image is needed.

Usage::

    basic-llava lens --model-path runs/demo/seed0/basic --model-base <llm folder> \
        --images runs/demo/data/images/test --max-images 30 --out runs/lens
    basic-llava lens --model-path liuhaotian/llava-v1.5-7b --images img1.jpg img2.jpg \
        --device cuda --dtype float16 --prefix-text "A chat between ... USER: "

``--model-base`` is needed for projector-only checkpoints (stage-1 pretraining output:
``config.json`` + ``mm_projector.bin``), exactly like LLaVA's ``load_pretrained_model``.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from basic_plugin.basic.target import default_depth
from basic_plugin.host.refusal import print_refusal
from basic_plugin.host.usage import CommandParser
from basic_plugin.lab.argv import strip_separator

#: English function words that never count as meaningful (lower case).
STOP_WORDS = frozenset("""
a about above after again against all also am an and any are aren as at be because been before
being below between both but by can cannot could did didn do does doesn doing don down during each
etc few for from further get got had has hasn have haven having he her here hers herself him
himself his how however into is isn it its itself just let may me might more most much must my
myself no nor not now of off on once one only or other ought our ours ourselves out over own per
same shall she should so some such than that the their theirs them themselves then there these
they this those through thus to too under until up upon us very via was wasn we were weren what
when where whether which while who whom whose why will with within without would yet you your
yours yourself yourselves
""".split())

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# -- the word classifier ----------------------------------------------------------------------
WORD_START_MARKERS = ("\u0120", "\u2581")  # "Ġ" (byte-level BPE), "▁" (SentencePiece)


def is_meaningful_word(text: str) -> bool:
    """True for a token text (a leading space = starts a word) that is a word of >= 3 ASCII letters, not a stop word."""
    if "\ufffd" in text or not text.startswith(" "):
        return False
    word = text[1:]
    if len(word) < 3 or not word.isascii() or not word.isalpha():
        return False
    return word.lower() not in STOP_WORDS


def token_text(tokenizer, token_id: int) -> str:
    """The vocabulary piece of ``token_id`` with its word-start marker shown as a leading space."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return ""
    if piece[:1] in WORD_START_MARKERS:
        return " " + piece[1:]
    return piece


def meaningful_token_mask(tokenizer, vocab_size: Optional[int] = None):
    """``(vocab_size,)`` bool tensor: which token ids are meaningful words (ids past the tokenizer: no)."""
    import torch

    n = len(tokenizer)
    vocab_size = n if vocab_size is None else int(vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(n, vocab_size)):
        if i in special:
            continue
        mask[i] = is_meaningful_word(token_text(tokenizer, i))
    return mask


# -- nearest words per layer -------------------------------------------------------------------
def normalized_vocabulary(embedding_weight):
    """Rows of the input embedding matrix, fp32, unit length (computed once per model)."""
    import torch.nn.functional as F

    return F.normalize(embedding_weight.detach().float(), dim=-1)


def nearest_tokens(states, vocab_normed, chunk: int = 2048):
    """Id of the vocabulary row with the highest cosine similarity, for each row of ``states`` (n, d)."""
    import torch
    import torch.nn.functional as F

    states = states.detach().float().reshape(-1, states.shape[-1]).to(vocab_normed.device)
    out = torch.empty(states.shape[0], dtype=torch.long, device=vocab_normed.device)
    with torch.no_grad():
        for start in range(0, states.shape[0], chunk):
            rows = F.normalize(states[start:start + chunk], dim=-1)
            out[start:start + chunk] = (rows @ vocab_normed.T).argmax(dim=-1)
    return out


class LayerLens:
    """Accumulates, per layer, the nearest vocabulary token of every image token seen."""

    def __init__(self, vocab_normed, meaningful, tokenizer=None, top: int = 8):
        self.vocab_normed = vocab_normed
        self.meaningful = meaningful.to(vocab_normed.device)
        self.tokenizer = tokenizer
        self.top = top
        self.per_image: List[List[int]] = []   # per image: meaningful count per layer
        self.tokens_per_image: List[int] = []
        self.counters: Dict[int, Counter] = {}

    def add(self, hidden_states: Sequence, image_mask) -> None:
        """``hidden_states``: (L+1) tensors (B, T, d); ``image_mask``: (B, T) bool, the image rows."""
        image_mask = image_mask.bool()
        batch = image_mask.shape[0]
        counts = [[0] * len(hidden_states) for _ in range(batch)]
        for layer, states in enumerate(hidden_states):
            for b in range(batch):
                ids = nearest_tokens(states[b][image_mask[b].to(states.device)], self.vocab_normed)
                counts[b][layer] = int(self.meaningful[ids].sum())
                self.counters.setdefault(layer, Counter()).update(ids.tolist())
        self.per_image += counts
        self.tokens_per_image += [int(m.sum()) for m in image_mask]

    def summary(self) -> dict:
        """Mean meaningful count per image and share, per layer; the most frequent nearest tokens."""
        if not self.per_image:
            raise ValueError("no images were analysed")
        layers = len(self.per_image[0])
        n = len(self.per_image)
        mean = [sum(c[layer] for c in self.per_image) / n for layer in range(layers)]
        tokens = sum(self.tokens_per_image) / n
        top = {}
        for layer, counter in sorted(self.counters.items()):
            items = counter.most_common(self.top)
            top[layer] = [(token_text(self.tokenizer, i) if self.tokenizer is not None else str(i), c) for i, c in items]
        best = max(range(layers), key=lambda layer: mean[layer])
        return {"images": n, "tokens_per_image": tokens, "mean_meaningful": mean,
                "share": [m / tokens for m in mean], "per_image": self.per_image,
                "best_layer": best, "top_tokens": top}


# -- loading a LLaVA model ------------------------------------------------------------------------
def load_llava(model_path, model_base=None, *, device: str = "cpu", dtype: str = "float32", model_class=None):
    """``(tokenizer, model, image_processor)`` of a LLaVA-1.5 checkpoint, built as LLaVA builds it.

    With ``model_base``: a projector-only checkpoint (``config.json`` + ``mm_projector.bin``,
    stage-1 output) on top of the base LLM, as ``llava.model.builder.load_pretrained_model``
    does for such checkpoints. Without: a full checkpoint. The plugin host is applied first,
    so plugin vision towers (DINOv2) build through ``llava_build_vision_tower``.
    Unlike ``load_pretrained_model`` (always fp16), ``dtype`` is honoured (fp32 on CPU).
    ``model_class``: another LLaVA-Llama class to build (e.g. with the plugin forward in front).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from basic_plugin.lab.towers import apply_lab_host

    apply_lab_host()
    from llava.model import LlavaLlamaForCausalLM

    cls = model_class or LlavaLlamaForCausalLM
    torch_dtype = getattr(torch, dtype)
    if model_base is not None:
        config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_base, use_fast=False)
        # not low_cpu_mem_usage: the projector is absent from the base and would stay on the meta device;
        # it is loaded right below (so transformers' "newly initialized" warning is silenced)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = cls.from_pretrained(model_base, config=config, torch_dtype=torch_dtype)
        finally:
            hf_logging.set_verbosity(verbosity)
        weights = torch.load(Path(model_path) / "mm_projector.bin", map_location="cpu", weights_only=True)
        missing = [k for k in weights if k not in model.state_dict()]
        if missing or not weights:
            raise ValueError(f"{model_path}/mm_projector.bin: keys not in the model: {missing[:4]}")
        result = model.load_state_dict({k: v.to(torch_dtype) for k, v in weights.items()}, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{model_path}/mm_projector.bin: unexpected keys {result.unexpected_keys[:4]}")
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
        model = cls.from_pretrained(model_path, torch_dtype=torch_dtype, low_cpu_mem_usage=True)
    tower = model.get_vision_tower()
    if tower is None:
        raise ValueError(f"{model_path}: the config names no vision tower (mm_vision_tower)")
    if not tower.is_loaded:
        tower.load_model()
    model.to(device=device, dtype=torch_dtype)
    model.eval()
    return tokenizer, model, tower.image_processor


def prefix_embeds(model, tokenizer, pixel_values, prefix_text: str = ""):
    """LLM input embeddings of ``[BOS] + prefix_text + <image>`` for each image, and the image-row mask.

    Tokenized with LLaVA's ``tokenizer_image_token`` (as training does); the ``<image>``
    placeholder is replaced by the projector output, as ``prepare_inputs_labels_for_multimodal`` does.
    Returns ``(embeds (B, P, d), image_mask (B, P) bool)``.
    """
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    ids = tokenizer_image_token(prefix_text + "<image>", tokenizer)
    if ids.count(IMAGE_TOKEN_INDEX) != 1:
        raise ValueError("the prefix text must not contain <image>")
    features = model.encode_images(pixel_values.to(device=model.device, dtype=model.dtype))
    embed = model.get_model().embed_tokens
    at = ids.index(IMAGE_TOKEN_INDEX)
    before = torch.tensor(ids[:at], dtype=torch.long, device=model.device)
    after = torch.tensor(ids[at + 1:], dtype=torch.long, device=model.device)
    batch, m = features.shape[:2]
    parts = [embed(before).unsqueeze(0).expand(batch, -1, -1), features, embed(after).unsqueeze(0).expand(batch, -1, -1)]
    embeds = torch.cat(parts, dim=1)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=model.device)
    mask[:, len(before):len(before) + m] = True
    return embeds, mask


def load_images(paths: Iterable, max_images: Optional[int] = None) -> List[Path]:
    """Image files from files and folders (folders: sorted, non-recursive), at most ``max_images``."""
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(p)
    return files[:max_images] if max_images else files


def pixel_batch(files: Sequence[Path], image_processor, model_config):
    """LLaVA's own preprocessing (``process_images``, honouring ``image_aspect_ratio``)."""
    from llava.mm_utils import process_images
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as img:
            images.append(img.convert("RGB"))
    return process_images(images, image_processor, model_config)


def run_lens(model, tokenizer, image_processor, files: Sequence[Path], *, batch: int = 8,
             prefix_text: str = "", progress: bool = True, desc: str = "lens") -> dict:
    """Per-layer nearest-word summary (:meth:`LayerLens.summary`) over ``files``."""
    import torch
    from tqdm.auto import tqdm

    vocab = normalized_vocabulary(model.get_input_embeddings().weight)
    lens = LayerLens(vocab, meaningful_token_mask(tokenizer, vocab.shape[0]), tokenizer)
    with torch.no_grad():
        for start in tqdm(range(0, len(files), batch), desc=desc, unit="batch", disable=not progress):
            pixels = pixel_batch(files[start:start + batch], image_processor, model.config)
            embeds, mask = prefix_embeds(model, tokenizer, pixels, prefix_text)
            out = model.get_model()(inputs_embeds=embeds, output_hidden_states=True, use_cache=False, return_dict=True)
            lens.add(out.hidden_states, mask)
    return lens.summary()


# -- output -----------------------------------------------------------------------------------
def plot_layers(results: Dict[str, dict], path, title: str = "", depth: Optional[int] = None) -> Path:
    """One line per model: mean meaningful nearest words per image, by layer (``depth``: shade layers 1..k)."""
    from basic_plugin.lab.plots import save, subplots

    fig, ax = subplots(figsize=(6.4, 3.6), dpi=100)
    tokens = None
    for label, summary in results.items():
        ys = summary["mean_meaningful"]
        ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=label)
        tokens = summary["tokens_per_image"]
    if depth:
        ax.axvspan(1, depth, color="0.85", alpha=0.5, zorder=0, label=f"BASIC target layers 1..{depth}")
    ax.set_xlabel("layer (0 = LLM input = projector output)")
    ax.set_ylabel(f"meaningful nearest words / {tokens:g} image tokens" if tokens else "meaningful nearest words")
    ax.set_title(title or "Image tokens whose nearest vocabulary embedding is a meaningful word")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def format_layer_table(results: Dict[str, dict]) -> str:
    labels = list(results)
    layers = len(next(iter(results.values()))["mean_meaningful"])
    head = "layer " + " ".join(f"{label:>12}" for label in labels)
    rows = [head]
    for layer in range(layers):
        rows.append(f"{layer:>5} " + " ".join(f"{results[label]['mean_meaningful'][layer]:>12.1f}" for label in labels))
    return "\n".join(rows)



def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser("lens", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="LLaVA checkpoint folder (or projector-only run with --model-base)")
    parser.add_argument("--model-base", default=None, help="base LLM folder, for projector-only checkpoints")
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--max-images", type=int, default=30, help="the paper used 30 images (default 30)")
    parser.add_argument("--out", default="runs/lens", help="folder for lens.json and lens.png")
    parser.add_argument("--prefix-text", default="", help="text before the image (e.g. the chat system prompt)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="the dtype the model runs in (default float32)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--label", default=None, help="name of this model in the plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(strip_separator(argv))
    for flag, path, what in (("--model-path", args.model_path, "a LLaVA checkpoint folder, or a projector-only run "
                                                               "with --model-base"),
                             ("--model-base", args.model_base, "the base LLM's folder"),
                             *(("--images", image, "image files and/or folders") for image in args.images)):
        if path is not None and not Path(path).exists():
            return print_refusal(f"{flag} {path}: no such file or folder; allowed: {what}")

    start = time.perf_counter()
    files = load_images(args.images, args.max_images)
    if not files:
        return print_refusal(f"--images {' '.join(args.images)}: no image found there; allowed: image files and/or "
                             "folders holding them")
    tokenizer, model, processor = load_llava(args.model_path, args.model_base, device=args.device, dtype=args.dtype)
    summary = run_lens(model, tokenizer, processor, files, batch=args.batch, prefix_text=args.prefix_text,
                       progress=not args.quiet)
    label = args.label or Path(args.model_path).name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lens.json").write_text(json.dumps({"model_path": str(args.model_path), "model_base": args.model_base,
                                               "images": [str(f) for f in files], **summary}, indent=1))
    png = plot_layers({label: summary}, out / "lens.png", depth=default_depth(len(summary["mean_meaningful"]) - 1))
    print(format_layer_table({label: summary}))
    layers = len(summary["mean_meaningful"]) - 1
    print(f"[lens] {summary['images']} images, {summary['tokens_per_image']:g} image tokens each, {layers} LLM layers; "
          f"meaningful nearest words: {summary['mean_meaningful'][0]:.1f} at the input, "
          f"peak {summary['mean_meaningful'][summary['best_layer']]:.1f} after layer {summary['best_layer']} "
          f"(BASIC's --basic_depth default is {default_depth(layers)}); {png} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
