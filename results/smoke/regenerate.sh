#!/usr/bin/env bash
# Regenerate results/smoke from the repository root: the CI-sized smoke sweep of configs/smoke.toml on the demo set.
# Tiny random-init models: the numbers show that the pipeline runs end to end, nothing about CLIP.
# tests/test_readme.py::test_results_smoke_is_a_fresh_run checks the tables equal a fresh run.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
rm -rf results/smoke/eval runs/smoke_s1
camloc eval --config configs/smoke.toml --out results/smoke/eval --no-progress
camloc threshold-search --config configs/smoke.toml --out runs/smoke_s1 --no-progress
cp runs/smoke_s1/{table_s1.csv,table_s1.md,curves.csv,curves.png} results/smoke/
cp runs/smoke_s1/summary.json results/smoke/threshold_search_summary.json
camloc report results/smoke/eval/* --layout s3 --out results/smoke/table_s3_layout.md
camloc report results/smoke/eval/* --layout long --format csv --out results/smoke/table_long.csv
