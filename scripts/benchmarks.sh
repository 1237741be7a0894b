#!/usr/bin/env bash
# Regenerate every figure, table and plot in docs/ (issue 5's evidence), on CPU, offline.
# About 1.5 h on 2 idle cores. Run on an otherwise idle machine: two of the steps time things.
#   bash scripts/benchmarks.sh            # everything
#   bash scripts/benchmarks.sh --quick    # a smoke run of each step (minutes; docs untouched)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,demo,bench]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
if [ "${1:-}" = "--quick" ]; then
  $PY -m benchmarks.paper_analog --seeds 1 --scale 0.02 --problems 20 --workdir bench-output/quick --no-docs
  $PY -m benchmarks.bench_merge --suites smollm2 --repeats 1 --no-docs
  $PY -m benchmarks.independent_init --quick --workdir bench-output/quick-independent-init --no-docs
  exit 0
fi
# timings first, while nothing else runs
$PY -m benchmarks.bench_merge                       # docs/performance.md: whole merges (SmolLM2, 8B-shaped layer, 1B-class), plain vs aligned
$PY -m benchmarks.bench_merge --layer-only          # docs/performance.md: one Llama-3.1-8B-shaped layer, per symmetry
$PY -m benchmarks.bench_assignment                  # prints: the 8B-shaped MLP matching, dense vs sparse, per stage
$PY -m benchmarks.bench_moe --expert-width 1792 --repeats 2   # docs/moe-benchmark.md: one Mixtral-8x7B-shaped MoE layer (experts at 1/8 width), plain vs aligned
$PY -m benchmarks.report_figures                    # docs/report.md: the report's plots (identity pair, scrambled pair, pruned child; ~15 s)
# then the quality results (the SmolLM2 family is the demo's, built once under demo-output/)
$PY -m examples.demo                                # docs/demo-results.md's table (printed, and in demo-output/results.md)
$PY -m benchmarks.layer_distances --sibling demo-output/models/sibling   # docs/layer-distances.md
$PY -m benchmarks.transfer_ablation                 # docs/transfer.md
$PY -m benchmarks.residual_transfer                 # docs/transfer.md: targets with moved heads and residual stream
$PY -m benchmarks.paper_analog --seeds 3            # docs/paper-analog.md
$PY -m benchmarks.independent_init --seeds 3 --widths 64:3 128:3 256:2   # docs/independent-init.md (about 2 h more on 1 thread: it trains wider models)
