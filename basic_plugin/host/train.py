"""``python -m basic_plugin.train``: LLaVA's own ``train()`` with the plugin host (default attention).

Same arguments as ``llava/train/train.py`` plus the flags of the installed
plugins (``--basic True`` for BASIC). Use it where flash-attn is absent, e.g. on CPU.
"""
from __future__ import annotations

import sys

from basic_plugin.host.refusal import Refusal, RunStopped, refusals_exit

UNUSED_ARGS = "Some specified arguments are not used by the HfArgumentParser"


def explain_unknown_flags(error: ValueError) -> str:
    """LLaVA's parser only says flags were unused; say which plugin would have taken them."""
    from basic_plugin.host.plugins import (ALLOW_ENV, BLOCK_ENV, available_entry_points, blocked_names,
                                           failed_plugins)

    blocked = sorted(blocked_names() & set(available_entry_points()))
    failed = failed_plugins()
    hint = (f" Blocked plugins (by {BLOCK_ENV} / {ALLOW_ENV}): {', '.join(blocked)}; their flags are unknown "
            "while they are blocked." if blocked else "")
    if failed:
        hint += f" Plugins that failed to load (see the warning above): {', '.join(failed)}."
    if not hint:
        hint = " No installed plugin defines them (see `basic-llava doctor`)."
    return f"unknown training flags: {error}.{hint}"


def main(attn_implementation: str | None = None) -> None:
    """Check the stack, install the host, run LLaVA's ``train()``; a refusal ends the process as
    one ``error:`` line with status 2, a guard's stop with status 3."""
    from basic_plugin.host.compat import allow_checkpoint_rng_states
    from basic_plugin.host.cpu import apply_cpu_workarounds, finish_distributed
    from basic_plugin.host.integration import apply_plugin_host
    from basic_plugin.host.versions import require_supported_versions

    with refusals_exit():
        require_supported_versions()
        apply_cpu_workarounds()
        allow_checkpoint_rng_states()
        apply_plugin_host()
        import llava.train.train as llava_train

        try:
            llava_train.train(attn_implementation=attn_implementation)
        except ValueError as error:
            if UNUSED_ARGS in str(error):
                raise Refusal(explain_unknown_flags(error)) from None
            raise
        except RunStopped as stop:
            print(f"basic-llava: {stop}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
    finish_distributed()


if __name__ == "__main__":
    main()
