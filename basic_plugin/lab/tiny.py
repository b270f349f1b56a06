"""A tiny random LLaVA-1.5, built offline, for tests and the quick demo.

Everything here is written from scratch with transformers/sentencepiece public APIs; nothing is
downloaded.  Three pieces:

* :func:`build_tiny_llava` writes a random Llama LM folder (with a real SentencePiece
  Llama-style tokenizer trained in about a second) and a random CLIP vision tower folder that
  LLaVA's own builders load (``--model_name_or_path`` / ``--vision_tower``).
* :func:`write_tiny_dataset` writes random PNG images and LLaVA-format records.
* :func:`tiny_train_args` returns the argument list for LLaVA's ``train()`` mirroring
  ``scripts/v1_5/pretrain.sh`` / ``finetune.sh`` plus the flags CPU runs need.

Heavy imports (torch, transformers, sentencepiece, PIL) happen inside the functions so that
importing this module stays cheap.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, os.PathLike]

#: Vision tower geometry: 56 px images cut in 14 px patches -> 4 x 4 = 16 patch features.
IMAGE_SIZE = 56
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION_HIDDEN = 32

#: Default ``--model_max_length`` for the tiny runs (tiny v1 samples: about 50-120 tokens with
#: the 16 image features).
TINY_MODEL_MAX_LENGTH = 512

#: Pieces of the chat templates that must stay single tokens.  LLaVA's ``v1`` masking
#: re-tokenizes every round on its own and counts tokens; "USER"/"ASSISTANT" split into
#: BPE fragments that merge differently in and out of context give "tokenization mismatch".
CHAT_TEMPLATE_SYMBOLS = (
    "USER", "ASSISTANT",                    # vicuna_v1 / llava_v1
    "Human", "Assistant", "###",            # v0
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",  # llama_2
)

# Word lists for caption-like sentences (tokenizer corpus and dataset text alike).
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple",
           "gray", "pink", "golden"]
_OBJECTS = ["cat", "dog", "car", "bicycle", "tree", "house", "boat", "bird", "horse", "train",
            "chair", "table", "umbrella", "kite", "clock", "bus", "cup", "flower", "ball",
            "bench", "truck", "sheep", "cow", "laptop", "pizza", "banana", "apple", "man",
            "woman", "child", "person", "group of people", "plate of food"]
_PLACES = ["on a wooden table", "in a green field", "next to a river", "on a busy street",
           "in front of a building", "under a blue sky", "near the beach", "in a small room",
           "in the snow", "on the grass", "by the window", "in a kitchen", "at the park",
           "on a city road", "inside a station"]
_VERBS = ["sitting", "standing", "lying", "parked", "resting", "waiting", "running", "flying",
          "walking", "shown"]
_ADJS = ["small", "large", "old", "new", "bright", "dark", "tall", "little", "shiny", "wet"]
_QUESTIONS = [
    "What is in the picture?",
    "Describe the image briefly.",
    "What do you see in this photo?",
    "Can you describe this image?",
    "What is shown here?",
]
_FOLLOWUPS = [
    ("What color is the {obj}?", "The {obj} is {color}."),
    ("Where is the {obj}?", "The {obj} is {place}."),
    ("Is there a {obj} in the image?", "Yes, there is a {adj} {obj}."),
    ("How many {obj}s are there?", "There is one {obj}."),
]
_TEXT_PROMPTS = [
    "Write a short caption for a {adj} {obj}.",
    "Describe a {color} {obj} {place}.",
    "Tell me about a {obj}.",
]
# The vicuna_v1 system prompt, so the tokenizer learns its words and v1 prompts stay short.
_SYSTEM_TEXT = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's "
                "questions.")


def _slots(rng: random.Random) -> Dict[str, str]:
    return dict(color=rng.choice(_COLORS), obj=rng.choice(_OBJECTS), place=rng.choice(_PLACES),
                verb=rng.choice(_VERBS), adj=rng.choice(_ADJS))


def _caption(rng: random.Random, s: Optional[Dict[str, str]] = None) -> str:
    s = s or _slots(rng)
    form = rng.randrange(4)
    if form == 0:
        return "A {adj} {color} {obj} {verb} {place}.".format(**s)
    if form == 1:
        return "There is a {color} {obj} {place}.".format(**s)
    if form == 2:
        return "The photo shows a {adj} {obj} {verb} {place}.".format(**s)
    return "a {color} {obj} {place}".format(**s)


def _tokenizer_corpus(seed: int, n: int = 2000) -> List[str]:
    rng = random.Random(seed)
    lines = [_caption(rng) for _ in range(n)]
    lines += [_SYSTEM_TEXT] * 20
    for q in _QUESTIONS:
        lines.append(q)
    for _ in range(200):
        s = _slots(rng)
        q, a = rng.choice(_FOLLOWUPS)
        lines.append(q.format(**s) + " " + a.format(**s))
        lines.append(rng.choice(_TEXT_PROMPTS).format(**s))
    for sym in CHAT_TEMPLATE_SYMBOLS:
        lines.append(f"{sym}: " + _caption(rng))
    return lines


def _train_sentencepiece(out_dir: Path, *, seed: int, vocab_size: int,
                         extra_symbols: Sequence[str]) -> Path:
    """Train a Llama-style BPE SentencePiece model (byte fallback, ids unk/bos/eos = 0/1/2).

    Trained from an in-memory iterator into an in-memory writer, so no file path ends up in
    the model's trainer spec and the bytes depend on ``seed`` only.
    """
    import io

    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    symbols = list(dict.fromkeys([*CHAT_TEMPLATE_SYMBOLS, *extra_symbols]))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus(seed)),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,   # small corpus: stop early rather than fail
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        # Llama's normalizer settings: keep whitespace as is (a trailing space stays a piece).
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=symbols,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def build_tiny_llava(root: PathLike, *, layers: int = 4, hidden: int = 64, heads: int = 4,
                     kv_heads: int = 2, vocab_extra: Sequence[str] = (), vocab_size: int = 1024,
                     seed: int = 0) -> Dict[str, Path]:
    """Write a tiny random LLaVA-1.5 (LM + tokenizer, vision tower + processor) under ``root``.

    ``vocab_extra``: more strings to keep as single tokenizer pieces (SentencePiece
    ``user_defined_symbols``), on top of :data:`CHAT_TEMPLATE_SYMBOLS`.
    ``vocab_size``: target SentencePiece vocabulary size (the trainer may stop below it).

    Returns ``{"root", "lm", "vision", "tokenizer_model"}``: ``lm`` is a
    ``LlamaForCausalLM`` folder for ``--model_name_or_path``, ``vision`` a
    ``CLIPVisionModel`` + ``CLIPImageProcessor`` folder for ``--vision_tower``.
    Deterministic given ``seed``.
    """
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel,
                              LlamaConfig, LlamaForCausalLM, LlamaTokenizer)

    root = Path(root)
    lm_dir, vision_dir, sp_dir = root / "lm", root / "vision", root / "sp"
    for d in (lm_dir, vision_dir, sp_dir):
        d.mkdir(parents=True, exist_ok=True)

    sp_model = _train_sentencepiece(sp_dir, seed=seed, vocab_size=vocab_size,
                                    extra_symbols=tuple(vocab_extra))
    tokenizer = LlamaTokenizer(
        vocab_file=str(sp_model), legacy=False, add_bos_token=True, add_eos_token=False,
        model_max_length=TINY_MODEL_MAX_LENGTH, padding_side="right",
    )
    tokenizer.save_pretrained(lm_dir)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)

    lm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(lm_config).save_pretrained(lm_dir, safe_serialization=True)

    vision_config = CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, projection_dim=VISION_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
        torch_dtype="float32",
    )
    torch.manual_seed(seed + 1)
    CLIPVisionModel(vision_config).save_pretrained(vision_dir, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_normalize=True, do_convert_rgb=True,
    ).save_pretrained(vision_dir)

    return {"root": root, "lm": lm_dir, "vision": vision_dir, "tokenizer_model": sp_model}


def _random_png(path: Path, rng: random.Random, square: bool = False) -> None:
    from PIL import Image

    w = rng.randrange(40, 90)
    h = w if square else rng.randrange(40, 90)
    # A few random colored blocks on a random background: cheap and deterministic.
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(3):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randrange(5, 30)), min(h, y0 + rng.randrange(5, 30))
        block = Image.new("RGB", (max(1, x1 - x0), max(1, y1 - y0)),
                          tuple(rng.randrange(256) for _ in range(3)))
        img.paste(block, (x0, y0))
    img.save(path, format="PNG")


def write_tiny_dataset(root: PathLike, *, n: int = 16, template: str = "plain", seed: int = 0,
                       text_only: int = 0, two_images: int = 0,
                       name: Optional[str] = None) -> Tuple[Path, Path]:
    """Write ``n`` LLaVA records and their PNG images under ``root``.

    ``template="plain"``: pretraining records (``<image>`` + caption, one round).
    ``template="v1"``: instruction records with 1-3 rounds (``<image>`` in the first question).
    ``text_only``: that many of the ``n`` records have no ``image`` key (and no ``<image>``);
    note LLaVA's ``plain`` preprocessing asserts an image token, so use them with ``v1``.
    ``two_images``: that many records carry ``"image": [a, b]`` and two ``<image>`` tokens
    (a multi-image layout vanilla LLaVA-1.5 does not load; for plugins that do).
    Returns ``(json_path, image_folder)``; image paths in records are relative to the folder.
    """
    if template not in ("plain", "v1"):
        raise ValueError(f"template must be 'plain' or 'v1', not {template!r}")
    if text_only < 0 or two_images < 0 or text_only + two_images > n:
        raise ValueError("need 0 <= text_only + two_images <= n")
    rng = random.Random(f"tiny-data-{seed}-{template}")
    root = Path(root)
    name = name or f"{template}_n{n}_t{text_only}_i{two_images}_s{seed}"
    image_folder = root / f"{name}_images"
    image_folder.mkdir(parents=True, exist_ok=True)

    kinds = ["image"] * (n - text_only - two_images) + ["text"] * text_only + ["two"] * two_images
    rng.shuffle(kinds)

    records = []
    for i, kind in enumerate(kinds):
        s = _slots(rng)
        caption = _caption(rng, s)
        rec: Dict[str, object] = {"id": f"tiny-{template}-{i:05d}"}
        images: List[str] = []
        if kind in ("image", "two"):
            for k in range(2 if kind == "two" else 1):
                fname = f"{i:05d}_{k}.png"
                _random_png(image_folder / fname, rng)
                images.append(fname)
            rec["image"] = images[0] if kind == "image" else images
        tags = "<image>\n" * len(images)
        if template == "plain":
            # LLaVA's LCS-558K style: the human turn is an instruction with <image>; the plain
            # template keeps only <image> + caption.
            conv = [{"from": "human", "value": tags + rng.choice(_QUESTIONS)},
                    {"from": "gpt", "value": caption}]
        else:
            first_q = rng.choice(_QUESTIONS) if images else rng.choice(_TEXT_PROMPTS).format(**s)
            conv = [{"from": "human", "value": tags + first_q},
                    {"from": "gpt", "value": caption}]
            for _ in range(rng.randrange(3)):
                q, a = rng.choice(_FOLLOWUPS)
                conv += [{"from": "human", "value": q.format(**s)},
                         {"from": "gpt", "value": a.format(**s)}]
        rec["conversations"] = conv
        records.append(rec)

    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return json_path, image_folder


def tiny_train_args(paths: Dict[str, PathLike], data_json: PathLike, image_folder: PathLike,
                    output_dir: PathLike, *, stage: str = "pretrain", max_steps: int = 4,
                    batch: int = 2, lora: bool = False,
                    deepspeed_config: Optional[PathLike] = None,
                    gradient_checkpointing: bool = True,
                    pretrain_mm_mlp_adapter: Optional[PathLike] = None,
                    mm_projector_lr: Optional[float] = None,
                    model_max_length: int = TINY_MODEL_MAX_LENGTH,
                    extra: Iterable[str] = ()) -> List[str]:
    """Arguments for LLaVA's ``train()`` for one stage of the tiny model (``paths``: ``lm``, ``vision``).

    :func:`basic_plugin.lab.llava_args.cpu_args`: ``scripts/v1_5/pretrain.sh``
    (``stage="pretrain"``) or ``finetune.sh`` / ``finetune_lora.sh`` (``stage="finetune"``,
    ``lora=True``) with the CPU flags and ``max_steps`` instead of epochs.
    ``deepspeed_config``: a path, or ``"zero2"``/``"zero3"`` for the shipped configs.
    ``extra`` is appended last (HfArgumentParser keeps the last value of a repeated flag).
    """
    from basic_plugin.lab.llava_args import cpu_args

    return cpu_args(model=paths["lm"], vision_tower=paths["vision"], data_path=data_json,
                    image_folder=image_folder, output_dir=output_dir, stage=stage, max_steps=max_steps,
                    batch=batch, lora=lora, deepspeed=deepspeed_config,
                    gradient_checkpointing=gradient_checkpointing,
                    pretrain_mm_mlp_adapter=pretrain_mm_mlp_adapter, mm_projector_lr=mm_projector_lr,
                    model_max_length=model_max_length, extra=extra)
