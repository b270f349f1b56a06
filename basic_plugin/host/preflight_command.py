"""``basic-llava preflight <train() flags>``: the data pre-flight alone, nothing loaded or trained.

Takes the flags of the training command (without ``--deepspeed``), so a dataset can be
checked on any machine before GPUs are booked; ``--data_preflight`` defaults to ``full``.
The flags are parsed by the host's own argument classes, which run the pre-flight
(:mod:`basic_plugin.host.preflight`) exactly as ``train()`` would.
"""
from __future__ import annotations

import os
import sys

from basic_plugin.host.arguments import check_command_line
from basic_plugin.host.preflight import REPORT_DIR
from basic_plugin.host.refusal import Refusal, print_refusal
from basic_plugin.host.usage import training_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--data_preflight" not in argv:
        argv += ["--data_preflight", "full"]
    parser = training_parser("preflight", __doc__)
    if "-h" in argv or "--help" in argv:  # the command's own help, not the command-line check's parser
        parser.print_help()
        return 0
    classes = tuple(parser.dataclass_types)
    try:
        check_command_line(argv, classes)
        _, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    except Refusal as error:
        return print_refusal(error)
    if training_args.data_preflight == "off":
        print("--data_preflight off: nothing checked", file=sys.stderr)
        return 0
    print(f"pre-flight passed: {data_args.data_path} "
          f"(report: {os.path.join(training_args.output_dir, REPORT_DIR, 'report.json')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
