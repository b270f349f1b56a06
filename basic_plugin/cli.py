"""The ``basic-llava`` command: ``doctor``, ``train`` and the project's jobs.

Every subcommand takes its own options directly (``basic-llava demo --steps 60``); a
``--`` right after the subcommand is accepted by all of them and dropped.
"""
from __future__ import annotations

import argparse
import sys


def doctor(args) -> int:
    """Print every check of :mod:`basic_plugin.host.doctor` (or ``--json``); exit 1 when one is bad."""
    import contextlib
    import json

    from basic_plugin.host.doctor import BAD, INFO, problems, report, run_checks

    as_json = getattr(args, "json", False)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        checks = run_checks()  # with --json, whatever an import prints stays off stdout
    count = problems(checks)
    if as_json:
        print(json.dumps(report(checks), indent=2))
        return 1 if count else 0
    print("basic-llava doctor")
    marks = {BAD: "BAD ", INFO: "info"}
    for c in checks:
        note = "" if c.note == "ok" else c.note
        print(f"  [{marks.get(c.status, 'ok  ')}] {c.name:<20} {c.found or '-':<24} {note}".rstrip())
    print("all good" if not count else f"{count} problem(s) found")
    return 1 if count else 0


def train(args) -> int:
    """Run LLaVA's ``train()`` with the plugin host; the remaining arguments are LLaVA's."""
    if {"-h", "--help"} & set(args.rest):  # the help alone: no version check, nothing initialised
        from basic_plugin.host.usage import training_parser

        training_parser("train", TRAIN_HELP).print_help()
        return 0
    from basic_plugin.host.train import main

    sys.argv = ["basic-llava train", *args.rest]
    main()
    return 0


TRAIN_HELP = ("LLaVA's train() with the plugin host: LLaVA's flags (llava/train/train.py), the host's and every "
              "installed plugin's (--basic True for BASIC). The same as python -m basic_plugin.train.")


#: subcommands that hand their own arguments to ``<module>.main(argv)``
JOBS = {
    "assets": ("basic_plugin.lab.assets.install", "install and convert the real pretrained parts (offline cache)"),
    "data": ("basic_plugin.lab.demo.data", "build the demo's LLaVA-format datasets from packaged images"),
    "demo": ("basic_plugin.lab.demo.run", "the CPU demo: baseline vs BASIC on a real mini-LLaVA, with a report"),
    "lens": ("basic_plugin.lab.lens", "per-layer nearest-word analysis of image tokens for a LLaVA checkpoint"),
    "channels": ("basic_plugin.lab.channels", "where BASIC's target keeps its energy, per layer and token (before training)"),
    "length": ("basic_plugin.lab.length", "the grid's training length, chosen on the monitor arm alone (resumable)"),
    "sweep": ("basic_plugin.lab.sweep", "BASIC's settings on the demo's model, chosen on a validation split (resumable)"),
    "preflight": ("basic_plugin.host.preflight_command", "check a LLaVA dataset as training would (same flags), loading no model"),
    "bench": ("basic_plugin.lab.bench", "BASIC's memory and time cost, naive vs chunked, and per training step"),
}


#: optional packages a subcommand will need, checked before it starts (the wheel requires none of them)
NEEDS = {name: ("matplotlib",) for name in ("demo", "lens", "channels", "length", "sweep")}


def job(args) -> int:
    """Run a subcommand's ``main``; a refusal, a missing optional package or path, is one ``error:`` line (status 2)."""
    import importlib

    from basic_plugin.host.refusal import refusals_exit
    from basic_plugin.host.usage import missing_dependency, require_packages

    with refusals_exit():
        if not {"-h", "--help"} & set(args.rest):
            require_packages(args.command, NEEDS.get(args.command, ()))
        try:
            module = importlib.import_module(JOBS[args.command][0])
            result = module.main(args.rest)
        except ModuleNotFoundError as error:
            refusal = missing_dependency(args.command, error)
            if refusal is None:
                raise
            raise refusal from None
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    from basic_plugin import __version__
    from basic_plugin.host.usage import CommandParser, summary

    parser = CommandParser(description=summary(__doc__))
    parser.add_argument("--version", action="version", version=f"basic-llava {__version__}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check the installed LLaVA training stack, GPU and plugins")
    p.add_argument("--json", action="store_true", help="one JSON object: every check and the problem count")
    p.set_defaults(func=doctor)
    p = sub.add_parser("train", help="LLaVA's train() with plugins (same flags as llava/train/train.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="LLaVA's training flags")
    p.set_defaults(func=train)
    for name, (_, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=f"the options of basic-llava {name} (its --help)")
        p.set_defaults(func=job)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[1] == "--":  # `basic-llava demo -- --steps 60`: the same, everywhere
        del argv[1]
    if argv and argv[0] in (*JOBS, "train"):  # hand the rest over untouched (argparse would eat "--x" flags)
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
        return train(args) if argv[0] == "train" else job(args)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
