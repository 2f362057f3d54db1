#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a GPU session: fetches into .device_wheels/ (git-ignored,
# carried to the device) the wheels of camloc's dependencies that the lent GPU image lacks (its python3
# 3.12 has torch, numpy, opencv, pandas, typer, rich, scikit-learn, timm, ...; see
# ../.library/device/KINDS.md). Then: run(command="bash benchmarks/gpu_run.sh", carry=[".device_wheels"]).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device_wheels && mkdir -p .device_wheels
fetch() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device_wheels "$@"
}
fetch clip-anytorch==2.6.0 ftfy wcwidth open-clip-torch==3.3.0 pycocotools "setuptools<82"  # clip needs pkg_resources
ls -1 .device_wheels
