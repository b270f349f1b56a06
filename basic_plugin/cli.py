"""The ``basic-llava`` command: ``doctor``, ``plugins``, ``train`` and the project's jobs."""
from __future__ import annotations

import argparse
import sys


def doctor(_args) -> int:
    """Print the versions found and say clearly what is wrong."""
    from basic_plugin.versions import check_versions

    problems = 0
    print("basic-llava doctor")
    for f in check_versions():
        mark = "ok " if f.ok else "BAD"
        problems += not f.ok
        print(f"  [{mark}] {f.package:<13} {f.found or '-':<16} {'' if f.note == 'ok' else f.note}")
    try:  # llava/model/__init__.py swallows import errors: import the module itself to see the cause
        import llava.model.language_model.llava_llama  # noqa: F401
        import llava.train.train  # noqa: F401
        print("  [ok ] llava.train.train imports")
    except Exception as exc:  # noqa: BLE001 - the point is to show any failure
        problems += 1
        print(f"  [BAD] importing LLaVA's training code failed: {type(exc).__name__}: {exc}")
    try:
        from basic_plugin.plugins import available_entry_points, blocked_names

        blocked = blocked_names()
        for name, ep in sorted(available_entry_points().items()):
            state = "blocked" if name in blocked else "enabled"
            print(f"  plugin {name:<10} {ep.value:<30} {state}")
    except Exception as exc:  # noqa: BLE001
        problems += 1
        print(f"  [BAD] listing plugins failed: {exc}")
    print("all good" if not problems else f"{problems} problem(s) found")
    return 1 if problems else 0


def train(args) -> int:
    """Run LLaVA's ``train()`` with the plugin host; the remaining arguments are LLaVA's."""
    from basic_plugin.train import main

    sys.argv = [sys.argv[0], *args.rest]
    main()
    return 0


#: subcommands that hand their own arguments to ``<module>.main(argv)``
JOBS = {
    "assets": ("basic_plugin.assets.install", "install and convert the real pretrained parts (offline cache)"),
    "data": ("basic_plugin.demo.data", "build the demo's LLaVA-format datasets from packaged images"),
    "demo": ("basic_plugin.demo.run", "the CPU demo: baseline vs BASIC on a real mini-LLaVA, with a report"),
    "lens": ("basic_plugin.lens", "per-layer nearest-word analysis of image tokens for a LLaVA checkpoint"),
    "bench": ("basic_plugin.bench", "BASIC's memory and time cost, naive vs chunked, and per training step"),
}


def job(args) -> int:
    import importlib

    module = importlib.import_module(JOBS[args.command][0])
    result = module.main(args.rest)
    return int(result or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basic-llava", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check the installed LLaVA training stack").set_defaults(func=doctor)
    p = sub.add_parser("train", help="LLaVA's train() with plugins (same flags as llava/train/train.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=train)
    for name, (_, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=job)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in (*JOBS, "train"):  # hand the rest over untouched (argparse would eat "--x" flags)
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
        return train(args) if argv[0] == "train" else job(args)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
