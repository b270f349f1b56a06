#!/usr/bin/env bash
# BASIC's GPU check (docs/PERFORMANCE.md, "GPU check") on a machine with torch + CUDA and no
# internet. First, where a package registry is reachable:  bash scripts/gpu_wheels.sh
# (fills gpu_wheels/); then on the GPU machine, from a copy of the repository with gpu_wheels/:
#   bash scripts/gpu_check.sh [script options] [check options]
#   bash scripts/gpu_check.sh --json out/gpu_check.json     # the full check, about 3-6 minutes
#   bash scripts/gpu_check.sh --tiny --device cpu           # the same code with tiny shapes
# It makes a venv that reuses the machine's torch (--system-site-packages, and a .pth naming
# the interpreter's own site-packages, for a python3 that is itself a venv), installs the
# wheels with --no-index --find-links gpu_wheels, and runs
# `python -m basic_plugin.lab.gpu_check` with the check options (see its --help).
# Script options: --python PY (default python3), --venv DIR (default
# ${TMPDIR:-/tmp}/basic-llava-gpu-check), --wheels DIR (default gpu_wheels), --reuse (keep a
# venv made before), --timeout S (the whole script, default 480), --dry-run (print the
# commands, run nothing), --help.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

py=python3
venv="${TMPDIR:-/tmp}/basic-llava-gpu-check"
wheels=gpu_wheels
reuse=no
dry=no
total_timeout=480
check_args=()
while [ $# -gt 0 ]; do
    case $1 in
        --python) py=$2; shift 2 ;;
        --venv) venv=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --reuse) reuse=yes; shift ;;
        --timeout) total_timeout=$2; shift 2 ;;
        --dry-run) dry=yes; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --python=*|--venv=*|--wheels=*|--timeout=*)
            echo "error: write '${1%%=*} VALUE', not '$1'" >&2; exit 2 ;;
        *) check_args+=("$1"); shift ;;
    esac
done
case $total_timeout in ''|*[!0-9]*) echo "error: --timeout needs whole seconds, not '$total_timeout'" >&2; exit 2 ;; esac

run() {  # print the command; run it unless --dry-run
    echo "+ $*" >&2
    [ $dry = yes ] || "$@"
}

vpy="$venv/bin/python"
check=("$vpy" -m basic_plugin.lab.gpu_check ${check_args[@]+"${check_args[@]}"})
pip_opts=(--no-index --find-links "$wheels" --no-compile --disable-pip-version-check --quiet)

if [ $dry = no ]; then
    if [ ! -f "$wheels/requirements.txt" ] || ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "error: no wheels in $wheels/; run 'bash scripts/gpu_wheels.sh' where pip can download, and bring $wheels/ along" >&2
        exit 2
    fi
    "$py" -c "import torch; print('[gpu_check.sh] python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
        || { echo "error: $py cannot import torch" >&2; exit 2; }
fi

if [ $reuse = no ] || [ ! -x "$vpy" ]; then
    run rm -rf "$venv"
    if [ $dry = yes ]; then
        echo "+ $py -m venv --system-site-packages $venv" >&2
    elif ! "$py" -m venv --system-site-packages "$venv" 2>/dev/null; then
        rm -rf "$venv"
        run "$py" -m venv --system-site-packages --without-pip "$venv"  # no ensurepip: the .pth brings the host's pip
    fi
    # The interpreter's own site-packages (where its torch is), after the venv's: a python3 that
    # is itself a venv gives --system-site-packages its base interpreter, not its packages.
    if [ $dry = yes ]; then
        echo "+ write \$(venv site-packages)/basic-llava-host-site.pth <- site-packages of $py" >&2
    else
        site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$py" -c 'import site, sysconfig
paths = list(site.getsitepackages()) + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
print("\n".join(dict.fromkeys(paths)))' >"$site/basic-llava-host-site.pth"
    fi
    run "$vpy" -m pip install "${pip_opts[@]}" -r "$wheels/requirements.txt"
    run "$vpy" -m pip install "${pip_opts[@]}" --no-deps -r "$wheels/requirements-no-deps.txt"
fi
if [ $dry = no ]; then
    "$vpy" -c "import torch, transformers, llava, pluggy
assert transformers.__version__ == '4.37.2', transformers.__version__
print('[gpu_check.sh] venv ready: transformers', transformers.__version__, 'torch', torch.__version__)"
fi

left=$((total_timeout - SECONDS))
if [ $left -lt 30 ]; then
    echo "error: only ${left} s of the ${total_timeout} s left for the check" >&2
    exit 124
fi
case " ${check_args[*]-} " in
    *" --budget-s"*) ;;
    *) check+=(--budget-s $((left - 70))) ;;  # the check's parts must end before the timeout
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if command -v timeout >/dev/null; then
    run timeout "$left" "${check[@]}"
else
    run "${check[@]}"
fi
