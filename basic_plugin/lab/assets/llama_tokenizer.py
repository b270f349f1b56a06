"""LLaVA-1.5's exact vocabulary (Llama-2 / Vicuna, 32000 pieces) as a ``LlamaTokenizer`` folder.

llama.cpp ships the Llama SentencePiece vocabulary as a tensor-less GGUF
(``vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf`` in the llama-cpp-python sdist) with
pieces, scores and piece types. This module rebuilds a SentencePiece ``tokenizer.model``
from it (BPE, byte fallback, identity normalizer, dummy prefix, unk/bos/eos = 0/1/2),
saves it with Vicuna-v1.5's tokenizer settings, and reads the reference encodings
(``.inp``/``.out``) shipped beside the GGUF for checking.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REFERENCE_SEPARATOR = "\n__ggml_vocab_test__\n"

# Vicuna-v1.5's tokenizer_config.json settings (what LLaVA-1.5 trains with).
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 4096,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}


def sentencepiece_model_bytes(gguf_path: str | os.PathLike) -> bytes:
    """A serialized SentencePiece ``ModelProto`` equivalent to Llama-2's ``tokenizer.model``."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Reading the Llama vocabulary GGUF needs the 'gguf' package (pip install gguf==0.19.0).") from exc
    # transformers' own copy of the proto module: importing sentencepiece's as well would
    # register "sentencepiece_model.proto" twice in protobuf's default pool, and
    # LlamaTokenizer(legacy=False) would then fail in this process.
    from transformers.convert_slow_tokenizer import import_protobuf

    spm_pb2 = import_protobuf()

    reader = gguf.GGUFReader(str(gguf_path))
    fields = reader.fields
    if fields["tokenizer.ggml.model"].contents() != "llama":
        raise ValueError("expected a SentencePiece ('llama') vocabulary")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    if not len(tokens) == len(scores) == len(types):
        raise ValueError("tokens, scores and types differ in length")
    valid_types = {int(v) for _, v in spm_pb2.ModelProto.SentencePiece.Type.items()}

    def ident(key: str, default: int) -> int:
        return int(fields[key].contents()) if key in fields else default

    unk, bos, eos = ident("tokenizer.ggml.unknown_token_id", 0), ident("tokenizer.ggml.bos_token_id", 1), ident("tokenizer.ggml.eos_token_id", 2)

    model = spm_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        kind = int(kind)
        if kind not in valid_types:
            raise ValueError(f"piece {piece!r} has unknown type {kind}")
        entry = model.pieces.add()
        entry.piece = piece
        entry.score = float(score)
        entry.type = kind

    spec = model.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.split_by_unicode_script = True
    spec.split_by_whitespace = True
    spec.split_by_number = True
    spec.treat_whitespace_as_suffix = False
    spec.allow_whitespace_only_pieces = True
    spec.max_sentencepiece_length = 16
    spec.character_coverage = 0.99995
    spec.vocabulary_output_piece_score = True
    spec.hard_vocab_limit = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk, bos, eos, -1
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = tokens[unk], tokens[bos], tokens[eos], "<pad>"
    spec.unk_surface = " \u2047 "

    norm = model.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = bool(fields["tokenizer.ggml.add_space_prefix"].contents()) if "tokenizer.ggml.add_space_prefix" in fields else True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    norm.normalization_rule_tsv = ""
    return model.SerializeToString()


def convert_llama_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Write ``tokenizer.model`` plus Vicuna-v1.5 tokenizer settings into ``out_dir``."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = sentencepiece_model_bytes(gguf_path)
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(data)  # fails loudly on an invalid model
    if processor.GetPieceSize() != 32000 or processor.IdToPiece(1) != "<s>" or processor.IdToPiece(2) != "</s>":
        raise ValueError("the rebuilt SentencePiece model is not Llama's 32000-piece vocabulary")
    (out / "tokenizer.model").write_bytes(data)
    config = dict(VICUNA_TOKENIZER_CONFIG)
    config.update({
        "bos_token": processor.IdToPiece(processor.bos_id()),
        "eos_token": processor.IdToPiece(processor.eos_id()),
        "unk_token": processor.IdToPiece(processor.unk_id()),
    })
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": config["bos_token"], "eos_token": config["eos_token"], "unk_token": config["unk_token"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def reference_encodings(gguf_path: str | os.PathLike) -> list[tuple[str, list[int]]]:
    """The ``(text, token ids)`` pairs of llama.cpp's ``.inp``/``.out`` files (no BOS)."""
    inp = Path(str(gguf_path) + ".inp").read_bytes().decode("utf-8")  # exact: no newline translation
    outp = Path(str(gguf_path) + ".out").read_bytes().decode("utf-8")
    texts = inp.split(REFERENCE_SEPARATOR)
    if texts[-1] != "":
        raise ValueError("the .inp file does not end with the case separator")
    texts = texts[:-1]
    lines = outp.split("\n")
    if lines[-1] != "":
        raise ValueError("the .out file does not end with a newline")
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    if len(texts) != len(ids):
        raise ValueError(f"{len(texts)} inputs but {len(ids)} outputs")
    return list(zip(texts, ids))
