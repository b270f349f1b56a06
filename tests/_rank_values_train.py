"""The plugin host's entry, recording what BASIC computes on each rank: one JSON line per training
batch in ``<output_dir>/values-rank<R>.jsonl`` (``rows``: the batch's image rows; the values of its
terms and metrics), so a test can compare the logged means with the per-rank, per-step values."""
import json
import os
import sys

import basic_plugin.basic.objective as objective
from basic_plugin.host.train import main

rank = int(os.environ.get("RANK", "0"))
basic_terms = objective.basic_terms


def recording_basic_terms(model, settings, batch, outputs, positions):
    losses, metrics = basic_terms(model, settings, batch, outputs, positions)
    if model.training:
        out = os.environ["VALUES_DIR"]
        with open(os.path.join(out, f"values-rank{rank}.jsonl"), "a") as f:
            values = {k: float(v.detach()) for k, v in {**losses, **metrics}.items()}
            f.write(json.dumps({"rows": positions.num_rows, **values}) + "\n")
    return losses, metrics


objective.basic_terms = recording_basic_terms

if __name__ == "__main__":
    sys.exit(main())
