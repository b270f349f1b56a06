"""``python -m basic_plugin.train``: LLaVA's own ``train()`` with the plugin host (default attention).

Same arguments as ``llava/train/train.py`` plus the flags of the installed
plugins (``--basic True`` for BASIC). Use it where flash-attn is absent, e.g. on CPU.
"""
from __future__ import annotations

import sys

from basic_plugin.host.refusal import Refusal, RunInterrupted, RunStopped, refusals_exit

UNUSED_ARGS = "Some specified arguments are not used by the HfArgumentParser"
#: the exit status of a run ended by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def main(attn_implementation: str | None = None) -> None:
    """Check the stack, install the host, run LLaVA's ``train()``; a refusal ends the process as
    one ``error:`` line with status 2, a guard's stop with status 3, Ctrl-C with one line and status 130."""
    from basic_plugin.host.arguments import check_command_line, unknown_flags_message
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

        check_command_line(sys.argv[1:], (llava_train.ModelArguments, llava_train.DataArguments,
                                          llava_train.TrainingArguments))
        try:
            llava_train.train(attn_implementation=attn_implementation)
        except ValueError as error:  # an arguments file (LLaVA's parser reads one) can still hold them
            if UNUSED_ARGS in str(error):
                raise Refusal(unknown_flags_message(str(error).split(": ", 1)[-1])) from None
            raise
        except RunStopped as stop:
            print(f"basic-llava: {stop}", file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED if isinstance(stop, RunInterrupted) else 3) from None
        except KeyboardInterrupt:
            print("basic-llava: interrupted (Ctrl-C) before a checkpoint could be written; the last saved "
                  "checkpoint-* of --output_dir, if any, is where the same command resumes", file=sys.stderr,
                  flush=True)
            raise SystemExit(INTERRUPTED) from None
    finish_distributed()


if __name__ == "__main__":
    main()
