"""``python -m basic_plugin.train``: LLaVA's own ``train()`` with the plugin host (default attention).

Same arguments as ``llava/train/train.py`` plus the flags of the installed
plugins (``--basic True`` for BASIC). Use it where flash-attn is absent, e.g. on CPU.
"""
from __future__ import annotations


def main(attn_implementation: str | None = None) -> None:
    from basic_plugin.cpu import apply_cpu_workarounds
    from basic_plugin.integration import apply_plugin_host
    from basic_plugin.versions import require_supported_versions

    require_supported_versions()
    apply_cpu_workarounds()
    apply_plugin_host()
    import llava.train.train as llava_train

    llava_train.train(attn_implementation=attn_implementation)


if __name__ == "__main__":
    main()
