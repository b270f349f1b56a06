"""The plugin host's entry with a disagreeing rank: on ranks other than 0 the channel choice is
reversed before the ranks agree, and every rank writes the channels it trains with to
``<output_dir>/channels-rank<R>.json`` (tests/test_train_e2e.py: the same channels on every rank)."""
import json
import os
import sys

import basic_plugin.basic.channels as channels
import basic_plugin.basic.plugin as plugin
from basic_plugin.host.train import main

rank = int(os.environ.get("RANK", "0"))
choose = channels.choose_channels
if rank:
    channels.choose_channels = lambda statistic, spec: list(reversed(choose(statistic, spec)))
settings_for = plugin.settings_for


def recording_settings_for(model, training_args, tokenizer=None):
    settings = settings_for(model, training_args, tokenizer)
    out = training_args.output_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"channels-rank{rank}.json"), "w") as f:
        json.dump(list(settings.drop_channels), f)
    return settings


plugin.settings_for = recording_settings_for

if __name__ == "__main__":
    sys.exit(main())
