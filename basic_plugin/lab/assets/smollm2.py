"""SmolLM2-135M-Instruct: llama.cpp GGUF -> a Hugging Face ``LlamaForCausalLM`` folder.

transformers 4.37.2 (LLaVA's pin) cannot read GGUF, so this module does it with the
``gguf`` package: every tensor is dequantized (``gguf.quants.dequantize``), reshaped to
the reversed GGUF shape (GGUF lists the fastest axis first), the rotary row permutation
that llama.cpp applies to ``attn_q``/``attn_k`` is undone, and the names are mapped to
``LlamaForCausalLM`` keys. The byte-level BPE tokenizer is rebuilt with the
``tokenizers`` library from the vocabulary, merges and special tokens in the file.

The weights are written as float32 safetensors: the Q4_1/Q8_0 values ``d * q + m`` are
exact in float32, not in float16/bfloat16.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# GGUF tensor names (after "blk.N.") -> LlamaForCausalLM names (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Token types in GGUF (the same numbering as SentencePiece's piece types).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Converting the SmolLM2 GGUF needs the 'gguf' package (pip install gguf==0.19.0)."
        ) from exc
    return gguf


def gguf_metadata(reader) -> dict:
    """All scalar/string/array key-values of a ``gguf.GGUFReader`` as Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _short_float(x: float) -> float:
    """A float32 value as the shortest decimal that round-trips (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (HF's rotate_half layout -> interleaved pairs).

    llama.cpp stores, per head, the row pairs (i, i + d/2) interleaved; HF Llama keeps the
    two halves apart. Per head: ``(n_head, rows/n_head/2, 2, cols)``, swap axes 1 and 2.
    """
    rows, cols = weight.shape
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {weight.shape} for {n_head} heads")
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"unknown GGUF tensor {gguf_name!r}")


def llama_config(meta: dict, has_output: bool) -> dict:
    """config.json for ``LlamaForCausalLM`` from the GGUF's ``llama.*`` keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    n_head = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    head_dim = hidden // n_head
    rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary ({rope_dim} of {head_dim}) is not Llama")
    vocab = int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "initializer_range": 0.02,
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "num_attention_heads": n_head,
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "pretraining_tp": 1,
        "rms_norm_eps": _short_float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_scaling": None,
        "rope_theta": _short_float(meta.get("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", meta.get("tokenizer.ggml.eos_token_id", 2))),
    }


def iter_hf_tensors(reader, n_head: int, n_kv_head: int, wrap: Callable[[Iterable], Iterable] = iter):
    """Yield ``(hf_name, float32 array)`` for every tensor of the GGUF."""
    import gguf

    for tensor in wrap(reader.tensors):
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        # a copy: F32 tensors are views into the read-only memory map of the file
        array = np.array(data, dtype=np.float32, copy=True).reshape(shape)
        if tensor.name.endswith("attn_q.weight"):
            array = unpermute_rotary(array, n_head)
        elif tensor.name.endswith("attn_k.weight"):
            array = unpermute_rotary(array, n_kv_head)
        yield hf_name(tensor.name), np.ascontiguousarray(array)


def build_bpe_tokenizer(meta: dict):
    """The byte-level BPE ``tokenizers.Tokenizer`` described by the GGUF's tokenizer keys.

    SmolLM2 ("smollm" pre-tokenizer): digits split one by one, then GPT-2's byte-level
    regex split without a prefix space; no normalizer; special tokens are the control
    tokens of the vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"expected a byte-level BPE (gpt2) vocabulary, got {meta.get('tokenizer.ggml.model')!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta["tokenizer.ggml.token_type"])
    merges = list(meta["tokenizer.ggml.merges"])
    for merge in merges:
        if merge.count(" ") != 1:
            raise ValueError(f"merge {merge!r} is not 'a b'")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the GGUF vocabulary")
    # tokenizers 0.15 reads merges as "a b" strings (the (a, b) list form came later).
    model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    specials = [
        AddedToken(tokens[i], special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for i, t in enumerate(types)
        if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
    ]
    tok.add_special_tokens(specials)
    return tok


def save_tokenizer(meta: dict, out_dir: str | os.PathLike) -> None:
    """Save the rebuilt tokenizer as a ``PreTrainedTokenizerFast`` folder (chat template kept).

    There is no slow (Python) tokenizer for this vocabulary: GPT-2's slow tokenizer does not
    split digits one by one and would tokenize numbers differently. ``tokenizer_class`` is
    ``PreTrainedTokenizerFast`` so that ``AutoTokenizer.from_pretrained(dir, use_fast=False)``
    (what LLaVA's ``train()`` asks for) still returns this exact, fast tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    tokens = list(meta["tokenizer.ggml.tokens"])

    def token(key, default=None):
        idx = meta.get(key)
        return tokens[int(idx)] if idx is not None else default

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_bpe_tokenizer(meta),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=[
            t for t, ty in zip(tokens, meta["tokenizer.ggml.token_type"]) if ty == TOKEN_CONTROL
        ],
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get("llama.context_length", 2048)),
        model_input_names=["input_ids", "attention_mask"],
        add_prefix_space=False,
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(str(out_dir))
    # save_pretrained writes the class it was called on; make it explicit and harmless for
    # use_fast=False (AutoTokenizer then resolves "PreTrainedTokenizerFast" itself).
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def convert_smollm2(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert a llama-architecture GGUF into ``out_dir`` (config, safetensors, tokenizer)."""
    gguf = _require_gguf()
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(str(gguf_path))
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = llama_config(meta, has_output="output.weight" in names)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    def wrap(items):
        return tqdm(items, desc="SmolLM2 GGUF -> safetensors", unit="tensor", disable=not progress, leave=False)

    tensors = {}
    for name, array in iter_hf_tensors(reader, n_head, n_kv, wrap):
        tensors[name] = torch.from_numpy(array)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}" for i in range(config["num_hidden_layers"]) for v in _LAYER_NAMES.values()
    }
    missing = expected - set(tensors)
    if missing:
        raise ValueError(f"GGUF lacks tensors: {sorted(missing)[:5]} ...")
    if tensors["model.embed_tokens.weight"].shape[0] != config["vocab_size"]:
        raise ValueError("embedding rows differ from the vocabulary size")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(meta, out)
    return out
