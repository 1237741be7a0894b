#!/usr/bin/env bash
# Run mergekit 0.1.5's OWN test suite (from its PyPI sdist) against this project's .venv,
# i.e. with mergekit-symalign installed and its planner hook active, and print the pytest
# summary line. Usage: bash benchmarks/mergekit_suite.sh [extra pytest args]
#
# Notes
# * The 0.1.5 sdist ships tests/test_*.py but NOT tests/common.py (or tests/__init__.py).
#   A stand-in common.py (make_picollama / make_picogranite / make_gpt2size /
#   make_picoLlaVa / run_and_check_merge, reconstructed from how the tests call them and
#   from older upstream versions) is written below.
# * tests/__init__.py is added: without it `tests` is a namespace package and the
#   editable install's .pth (which puts the repo root on sys.path) makes THIS repo's
#   tests/ package shadow it -> "No module named 'tests.common'".
# * Only tests/ and pyproject.toml (pytest config) are used; the sdist's mergekit/ source
#   is left out so the tests import the mergekit installed in .venv.
# * With the plugin active, the parametrization over merge_methods.registered_methods()
#   in test_merge_method_regressions.py also covers the 8 symmetry_aligned_* methods.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mergekit_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  "mergekit==0.1.5" -d "$WORK/dl" >"$WORK/download.log" 2>&1; then
  cat "$WORK/download.log" >&2
  exit 2
fi
tar xzf "$WORK"/dl/mergekit-0.1.5.tar.gz -C "$WORK"
SRC="$WORK/mergekit-0.1.5"
RUN="$WORK/run"
mkdir -p "$RUN"
cp -r "$SRC/tests" "$SRC/pyproject.toml" "$RUN/"
touch "$RUN/tests/__init__.py"
if [ ! -f "$RUN/tests/common.py" ]; then
cat > "$RUN/tests/common.py" <<'PYEOF'
# STAND-IN for mergekit's tests/common.py (absent from the 0.1.5 sdist); not upstream code.
import os
import tempfile
from typing import Callable, Optional

from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
):
    if index_json_name is None:
        index_json_name = "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as tmpdir:
        run_merge(config, out_path=tmpdir, options=MergeOptions())
        # mergekit 0.1.5 writes a bare model.safetensors for single-shard outputs
        assert os.path.exists(os.path.join(tmpdir, index_json_name)) or os.path.exists(
            os.path.join(tmpdir, index_json_name[: -len(".index.json")])
        ), "No model weights produced by merge"
        assert os.path.exists(os.path.join(tmpdir, "config.json")), "No config json"
        index = ShardedTensorIndex.from_disk(tmpdir)
        if check_nan:
            loader = LazyTensorLoader(index, lazy_unpickle=False)
            tp = loader.index.tensor_paths
            for name in sorted(tp.keys(), key=lambda k: tp[k]):
                assert not loader.get_tensor(name).view(-1).isnan().any(), "NaN in output"
        if check_tensors:
            model_config = AutoConfig.from_pretrained(tmpdir)
            if auto_arch:
                arch_info = get_architecture_info(config, MergeOptions())
            else:
                arch_info = arch_info_for_config(model_config)
            if arch_info is not None:
                for wi in arch_info.all_weights(model_config):
                    if wi.optional:
                        continue
                    names = [wi.name, *(wi.aliases or ()), *(wi.tied_names or ())]
                    if not any(n in index.tensor_paths for n in names):
                        raise RuntimeError(f"Output missing tensor {wi.name}")
        if validate:
            validate(tmpdir)


def make_picollama(path: str, vocab_size: int = 64):
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                      num_attention_heads=16, num_hidden_layers=2)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picogranite(path: str, vocab_size: int = 64):
    cfg = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                        num_attention_heads=16, num_key_value_heads=16,
                        num_hidden_layers=2)
    GraniteForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_gpt2size(path: str):
    cfg = GPT2Config(n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024,
                     vocab_size=50257)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picoLlaVa(path: str):
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                              num_attention_heads=2, hidden_size=64,
                              intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_attention_heads=16, num_hidden_layers=2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    LlavaForConditionalGeneration(config=cfg).save_pretrained(path, safe_serialization=True)
    return str(path)
PYEOF
fi

# Show that the plugin is active in this interpreter.
"$PY" -c "
import mergekit.merge as m, mergekit.merge_methods.registry as r
print('MergePlanner =', m.MergePlanner.__module__ + '.' + m.MergePlanner.__qualname__)
print('symmetry_aligned methods:', sum(s.spec.name.startswith('symmetry_aligned') for s in r.registered_methods()))
"

cd "$RUN"
set +e
timeout 1200 "$PY" -m pytest -p no:cacheprovider -q -rfE "$@" >"$WORK/pytest.log" 2>&1
rc=$?
set -e
grep -E "^(FAILED|ERROR) " "$WORK/pytest.log" || true
tail -n 1 "$WORK/pytest.log"
exit $rc
