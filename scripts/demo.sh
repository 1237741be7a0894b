#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the demo: plain vs symmetry-aligned task arithmetic on a
# family built from the real SmolLM2-135M-Instruct, through mergekit-yaml, offline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m examples.demo "$@"   # examples/demo.py (not part of the installed package)
