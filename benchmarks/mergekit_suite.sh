#!/usr/bin/env bash
# Run mergekit 0.1.5's OWN test suite (from its PyPI sdist) against this project's .venv,
# i.e. with mergekit-symalign installed and its planner hook active, and print the pytest
# summary line. Usage:
#   bash benchmarks/mergekit_suite.sh [extra pytest args]
#   MERGEKIT_TESTS_COMMON=/path/to/mergekit/tests/common.py bash benchmarks/mergekit_suite.sh
#
# tests/common.py -- which one is used
# * The 0.1.5 sdist ships tests/test_*.py but NOT tests/common.py (nor tests/__init__.py).
#   Nothing but the sdist is downloaded at run time (PyPI only), and no upstream code is
#   kept in this repository, so by default a STAND-IN common.py written for this project
#   is used (the heredoc below). The script prints which common.py it used.
# * MERGEKIT_TESTS_COMMON=<file>: use that file instead of the stand-in, e.g. the real
#   tests/common.py from a mergekit git checkout you have (it is copied into the temporary
#   run directory only). If the variable is set but is not a file, the script stops (rc 2).
#   If a future sdist ships its own tests/common.py, that one is used unless the variable
#   is set.
#
# How the stand-in was checked against upstream (arcee-ai/mergekit)
# * Release 0.1.5 has no git tag (the tags stop at v0.1.4) and no commit in the fetched
#   snapshot sets version 0.1.5. The index of GitHub sources holds commit
#   9eeb539892c6753b032ea164e818b44a8c7a401b, whose pyproject.toml says version = "0.1.5"
#   and whose tests/test_easy_define.py, test_vocabulary_axis.py and
#   test_batched_merges.py match the sdist's (same length, same text where compared); it
#   is taken as the 0.1.5 commit (its pyproject.toml still has a `vllm` extra that the
#   sdist's lacks, so the release tree may be a neighbouring commit).
#   Its tests/common.py could NOT be read: the newest snapshot of the repository
#   available here ends at a6e402884ba9bc30da7f23e8304a35f19485de95 (version still
#   0.1.4, after "Update to Transformers v5 (#692)") and does not contain 9eeb539, and
#   the index stores no tests/common.py at 9eeb539.
# * So the stand-in was compared with tests/common.py at a6e4028 (last changed by
#   813142d "Add IBM Granite architecture support (#683)"), the newest real version
#   available. Every name and keyword the 0.1.5 tests take from tests.common exists
#   there with the same signature. The stand-in re-implements that file's behaviour (not
#   its text): same functions and signatures; run_and_check_merge accepts the index json
#   or the single .safetensors file, requires config.json, scans every tensor for NaN,
#   requires each non-optional weight of the architecture (own name or an alias; tied
#   names do not count; no architecture info = failure), then runs validate; the same
#   toy model sizes (make_picogranite: 2 attention heads and 2 KV heads).
#   Checked by loading both files side by side: identical signatures; each make_* gives
#   the same config.json and the same tensor names and shapes; run_and_check_merge
#   passes/fails alike on a good merge, a failing validate, a missing weights file and an
#   architecture needing an absent tensor (there upstream fails with a TypeError when
#   that weight has no aliases, the stand-in with RuntimeError). The whole suite gives
#   the same counts with either file (CPU: 526 passed, 82 skipped = the CUDA/MPS tests).
# * Before this check the stand-in built make_picogranite with 16 heads/16 KV heads
#   (upstream: 2/2), accepted tied names and silently skipped the tensor check when no
#   architecture was found, and always opened the output index (even with both checks
#   off).
#
# Other notes
# * tests/__init__.py (empty upstream too) is added: without it `tests` is a namespace
#   package and the editable install's .pth (which puts the repo root on sys.path) makes
#   THIS repo's tests/ package shadow it -> "No module named 'tests.common'".
# * Only tests/ and pyproject.toml (pytest config) are used; the sdist's mergekit/ source
#   is left out so the tests import the mergekit installed in .venv.
# * With the plugin active, the parametrization over merge_methods.registered_methods()
#   in test_merge_method_regressions.py also covers the 8 symmetry_aligned_* methods.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ -n "${MERGEKIT_TESTS_COMMON:-}" ] && [ ! -f "$MERGEKIT_TESTS_COMMON" ]; then
  echo "MERGEKIT_TESTS_COMMON=$MERGEKIT_TESTS_COMMON is not a file" >&2
  exit 2
fi

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

if [ -n "${MERGEKIT_TESTS_COMMON:-}" ]; then
  cp "$MERGEKIT_TESTS_COMMON" "$RUN/tests/common.py"
  COMMON_SRC="MERGEKIT_TESTS_COMMON=$MERGEKIT_TESTS_COMMON"
elif [ -f "$RUN/tests/common.py" ]; then
  COMMON_SRC="the sdist's own tests/common.py"
else
  COMMON_SRC="stand-in (benchmarks/mergekit_suite.sh)"
cat > "$RUN/tests/common.py" <<'PYEOF'
# STAND-IN for mergekit's tests/common.py (absent from the 0.1.5 sdist), written for
# mergekit-symalign; it is not upstream code. It re-implements the behaviour of upstream's
# tests/common.py (checked against arcee-ai/mergekit a6e4028, see the script header).
import os
import tempfile
from typing import Callable, Optional

import transformers as tf

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def _assert_outputs_written(out_dir: str, index_json_name: str) -> None:
    # Sharded output has the index json; a single-shard output has only the file the
    # index would point at (the name without ".index.json").
    index_file = os.path.join(out_dir, index_json_name)
    shard_file = index_file.replace(".index.json", "")
    assert os.path.exists(index_file) or os.path.exists(shard_file), (
        "No model produced by merge"
    )
    assert os.path.exists(os.path.join(out_dir, "config.json")), (
        "No config json produced by merge"
    )


def _assert_no_nan(out_dir: str) -> None:
    loader = LazyTensorLoader.from_disk(out_dir, lazy_unpickle=False)
    for name in loader.index.tensor_paths:
        assert not loader.get_tensor(name).isnan().any(), "Output contains NaN"


def _assert_all_weights_present(
    config: MergeConfiguration, out_dir: str, auto_arch: bool
) -> None:
    out_config = tf.AutoConfig.from_pretrained(out_dir)
    if auto_arch:
        arch = get_architecture_info(config, MergeOptions())
    else:
        arch = arch_info_for_config(out_config)
    if arch is None:
        raise RuntimeError("No architecture info for the merged model")
    present = set(ShardedTensorIndex.from_disk(out_dir).tensor_paths)
    for w in arch.all_weights(out_config):
        if w.optional:
            continue
        # the weight's own name or one of its aliases; tied names are not accepted
        if w.name in present or present.intersection(w.aliases or ()):
            continue
        raise RuntimeError(f"Output missing tensor {w.name}")


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
):
    with tempfile.TemporaryDirectory() as out_dir:
        run_merge(config, out_path=out_dir, options=MergeOptions())
        _assert_outputs_written(out_dir, index_json_name or "model.safetensors.index.json")
        if check_nan:
            _assert_no_nan(out_dir)
        if check_tensors:
            _assert_all_weights_present(config, out_dir, auto_arch)
        if validate:
            validate(out_dir)


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


# Toy text decoder shared by make_picollama and make_picoLlaVa's language model:
# 2 layers, hidden 32, MLP 48, 16 heads (head_dim 2), KV heads default to the heads.
_PICO_LLAMA = dict(hidden_size=32, intermediate_size=48, num_attention_heads=16,
                   num_hidden_layers=2)


def make_picollama(path: str, vocab_size: int = 64):
    return _save(tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab_size, **_PICO_LLAMA)),
                 path)


def make_picogranite(path: str, vocab_size: int = 64):
    # 2 layers, hidden 32, MLP 48, 2 query heads and 2 KV heads (head_dim 16)
    cfg = tf.GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2)
    return _save(tf.GraniteForCausalLM(cfg), path)


def make_gpt2size(path: str):
    # full GPT-2 small geometry: 12 layers x 768, 12 heads, 1024 positions, vocab 50257
    cfg = tf.GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12,
                        n_positions=1024, n_ctx=1024)
    return _save(tf.GPT2LMHeadModel(cfg), path)


def make_picoLlaVa(path: str):
    # CLIP vision tower: 32px images, 4px patches, 2 layers x 64, 2 heads, MLP 128;
    # language model: the pico llama above with vocab 64; 16 image tokens.
    vision = tf.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2,
                                 hidden_size=64, intermediate_size=128,
                                 num_attention_heads=2)
    text = tf.LlamaConfig(vocab_size=64, **_PICO_LLAMA)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    return _save(tf.LlavaForConditionalGeneration(config=cfg), path)
PYEOF
fi
echo "tests/common.py: $COMMON_SRC (sha256 $(sha256sum "$RUN/tests/common.py" | cut -c1-12))"

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
