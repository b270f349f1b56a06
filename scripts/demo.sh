#!/usr/bin/env bash
# The CPU demo (README quick start): a real mini-LLaVA (DINOv2-small + SmolLM2-135M) trained
# with and without BASIC on Fashion-MNIST captions, evaluated, and reported under runs/demo/.
#   bash scripts/demo.sh                 # default run (200 steps per arm): 28 min measured on 2 shared cores
#   bash scripts/demo.sh --steps 300     # any `basic-llava demo` option (see --help)
# Works from a fresh clone: sets up .venv, installs Debian's dataset-fashion-mnist when it is
# missing (apt-get, as root or through sudo), downloads/converts the pretrained parts once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh

fmnist=/usr/share/datasets/fashion-mnist
have_fmnist() {
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [ -f "$fmnist/$f" ] || return 1
  done
}
if ! have_fmnist; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[demo] Fashion-MNIST is missing and there is no apt-get here: install Debian's dataset-fashion-mnist" >&2
    echo "       (or pass --fmnist-dir DIR with the four *-idx*-ubyte.gz files)" >&2
    exit 1
  fi
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "[demo] Fashion-MNIST is missing; as root run: apt-get install dataset-fashion-mnist" >&2
    exit 1
  fi
  echo "[demo] installing Debian package dataset-fashion-mnist (Fashion-MNIST, about 30 MB)"
  export DEBIAN_FRONTEND=noninteractive
  if ! "${as_root[@]}" apt-get install -y -q dataset-fashion-mnist; then
    "${as_root[@]}" apt-get update -q
    "${as_root[@]}" apt-get install -y -q dataset-fashion-mnist
  fi
  have_fmnist || { echo "[demo] dataset-fashion-mnist installed but $fmnist is incomplete" >&2; exit 1; }
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
       TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
# "--": everything after it is the demo's own options
exec .venv/bin/basic-llava demo -- "$@"
