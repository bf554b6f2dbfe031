#!/usr/bin/env bash
# Prepare the ARM64 onnxruntime (qemu-user + arm64 sysroot + aarch64 wheels) that tests/test_arm64.py
# and `onnx-lowrank bench --arm64` use. Call it after the package is installed in the active venv:
#
#     bash .ci/arm64-setup.sh
#
# Cached in ${ONNX_LOWRANK_ARM64_CACHE:-~/.cache/onnx-lowrank/arm64} (~200 MB): keep that directory
# between CI runs and a second run only re-checks it (~3 s). A cold run downloads ~110 MB (Debian
# packages and wheels) and takes ~30 s. Needs apt-get/dpkg (Debian/Ubuntu); root only if the system's
# package lists must be refreshed to fetch qemu-user-static.
#
# Never fails CI: when the runtime cannot be prepared it prints why and exits 0; the ARM64 tests
# then skip with the reason.
set -uo pipefail

PY=${PYTHON:-python}
note() { echo "arm64-setup: $*"; }

if ! "$PY" -c "import onnx_lowrank.cli.arm64" 2>/dev/null; then
    note "onnx-lowrank is not importable with '$PY'; install the package first. ARM64 tests will skip."
    exit 0
fi
if ! command -v qemu-aarch64-static >/dev/null 2>&1 && ! command -v apt-get >/dev/null 2>&1 \
        && [ ! -x "${ONNX_LOWRANK_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-lowrank/arm64}/qemu/qemu-aarch64-static" ]; then
    note "no apt-get here (not Debian/Ubuntu) and no qemu-aarch64-static: skipping. ARM64 tests will skip."
    exit 0
fi

start=$(date +%s)
# `python -m onnx_lowrank.cli.arm64` is `onnx-lowrank arm64-setup`; 15 minutes means a hung mirror
if timeout 900 "$PY" -m onnx_lowrank.cli.arm64; then
    note "ARM64 runtime ready ($(( $(date +%s) - start )) s)"
else
    note "ARM64 runtime NOT prepared (see the error above); continuing, the ARM64 tests will skip"
fi
exit 0
