#!/usr/bin/env bash
# BASIC's cost benchmark (docs/PERFORMANCE.md): sets up .venv (idempotent), then runs
# `python -m basic_plugin.lab.bench` with the arguments given, e.g.
#   bash scripts/bench.sh                      # default run, about 5-10 minutes on 2 CPU cores
#   bash scripts/bench.sh --full --json b.json # every batch size timed, both stages
#   bash scripts/bench.sh --device cuda        # on a GPU: cuda max_memory_allocated + events
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m basic_plugin.lab.bench "$@"
