#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.sh installs on a GPU machine that has a recent
# torch with CUDA (and numpy) but no internet: the CPU working set's pins for what the check
# imports (transformers 4.37.2, tokenizers, safetensors, huggingface_hub, pluggy, llava-torch)
# and the packages those need (pillow too: llava imports PIL). Not torch, not numpy (assumed
# on the machine), not deepspeed, accelerate, peft or sentencepiece: the check imports none.
#
#   bash scripts/gpu_wheels.sh            # download into gpu_wheels/ (ignored by git)
#   bash scripts/gpu_wheels.sh --list     # print the pins and Python versions, download nothing
#   bash scripts/gpu_wheels.sh --requirements  # print what gpu_check.sh will ask pip for
#
# Binary wheels are fetched for CPython 3.10, 3.11 and 3.12 on manylinux x86_64 (pure-python
# and abi3 wheels once); the total is printed and must stay under 60 MiB, since the folder
# travels with the repository tree to the GPU machine.
# Environment: GPU_WHEELS_DIR (default gpu_wheels), GPU_WHEELS_PYTHONS (default "3.10 3.11 3.12").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

dest=${GPU_WHEELS_DIR:-gpu_wheels}
pythons=${GPU_WHEELS_PYTHONS:-"3.10 3.11 3.12"}
limit_mib=60

# name and default pin; a pin in constraints.txt (the CPU working set) wins, then one in
# constraints-gpu.txt. The first group is what gpu_check.sh asks pip for; the second is
# installed without dependencies (llava-torch's own pins want torch 2.1.2; llava imports PIL);
# the rest are the dependencies of the first group that a bare torch machine may lack.
top_level="transformers==4.37.2 tokenizers==0.15.1 huggingface_hub==0.36.2 safetensors==0.8.0 pluggy==1.7.0"
no_deps="llava-torch==1.2.2.post1 pillow==13.0.0"
dependencies="hf-xet==1.8.0 tqdm==4.70.1 packaging==26.4 pyyaml==6.0.4 regex==2026.11.19 requests==2.34.2
urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3 filelock==4.3.1
fsspec==2026.9.0 typing_extensions==4.16.0"
# pins that differ by Python version (no wheel of the pin above for that version)
overrides_for() {
    case $1 in
        3.10) echo "regex==2026.9.29 filelock==4.1.0 pillow==12.3.0" ;;
        *) echo "" ;;
    esac
}

normal() { echo "$1" | tr '[:upper:]_.' '[:lower:]--'; }

pin() {  # NAME==DEFAULT -> NAME==VERSION from the constraints files, else the default
    local spec=$1 name version file line
    name=${spec%%==*}
    version=${spec#*==}
    for file in constraints.txt constraints-gpu.txt; do
        [ -f "$file" ] || continue
        while IFS= read -r line; do
            line=${line%%#*}
            line=${line//[[:space:]]/}
            case $line in *==*) ;; *) continue ;; esac
            if [ "$(normal "${line%%==*}")" = "$(normal "$name")" ]; then
                echo "$name==${line#*==}"
                return
            fi
        done <"$file"
    done
    echo "$name==$version"
}

pins() { local s; for s in $1; do pin "$s"; done; }

requirement_lines() {  # pins of a group, with environment markers where a Python version overrides one
    local spec version over line others
    for spec in $(pins "$1"); do
        line=$spec
        others=""
        for version in $pythons; do
            for over in $(overrides_for "$version"); do
                if [ "$(normal "${over%%==*}")" = "$(normal "${spec%%==*}")" ]; then
                    echo "$over; python_version == \"$version\""
                    others="$others and python_version != \"$version\""
                fi
            done
        done
        [ -z "$others" ] || line="$spec; ${others# and }"
        echo "$line"
    done
}
case "${1:-}" in
    --requirements)
        echo "# $dest/requirements.txt"
        requirement_lines "$top_level"
        echo "# $dest/requirements-no-deps.txt"
        requirement_lines "$no_deps"
        exit 0 ;;
    --list)
        echo "# python versions: $pythons"
        echo "# requirements (installed with their dependencies):"
        pins "$top_level"
        echo "# installed with --no-deps:"
        pins "$no_deps"
        echo "# dependencies:"
        pins "$dependencies"
        for version in $pythons; do
            [ -z "$(overrides_for "$version")" ] || echo "# for CPython $version instead: $(overrides_for "$version")"
        done
        exit 0 ;;
    -h|--help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0 ;;
    "") ;;
    *) echo "error: unknown argument '$1' (use --list, --requirements or --help)" >&2; exit 2 ;;
esac

if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
mkdir -p "$dest"
all=$(pins "$top_level $no_deps $dependencies")
specs_for() {  # the pinned set with the overrides of Python version $1
    local spec over name out=""
    for spec in $all; do
        name=${spec%%==*}
        for over in $(overrides_for "$1"); do
            [ "$(normal "${over%%==*}")" = "$(normal "$name")" ] && spec=$over
        done
        out="$out $spec"
    done
    echo "$out"
}
keep_set="$all"
for version in $pythons; do keep_set="$keep_set $(overrides_for "$version")"; done
# drop wheels of other versions left from an earlier run: two versions of one name stop the install
for w in "$dest"/*.whl; do
    [ -e "$w" ] || continue
    base=$(basename "$w")
    keep=no
    for spec in $keep_set; do
        prefix="$(normal "${spec%%==*}")-${spec#*==}-"
        case "$(normal "${base%%-*}")-$(echo "$base" | cut -d- -f2)-" in "$prefix") keep=yes ;; esac
    done
    [ $keep = yes ] || { echo "removing $base (not in the pinned set)"; rm -f "$w"; }
done
for version in $pythons; do
    echo "== wheels for CPython $version"
    # shellcheck disable=SC2086
    "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$version" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
        -d "$dest" $(specs_for "$version")
done
requirement_lines "$top_level" >"$dest/requirements.txt"
requirement_lines "$no_deps" >"$dest/requirements-no-deps.txt"

total=0
for w in "$dest"/*.whl; do
    size=$(stat -c %s "$w")
    total=$((total + size))
    printf '%10d  %s\n' "$size" "$(basename "$w")"
done
total_mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "total: $total bytes ($total_mib MiB, limit $limit_mib MiB) in $dest/"
if [ "$total" -gt $((limit_mib * 1048576)) ]; then
    echo "error: the wheels exceed $limit_mib MiB" >&2
    exit 1
fi
