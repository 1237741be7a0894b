"""Cost of a cross-size transfer (a pruned child as the base) against a plain merge.

    .venv/bin/python -m benchmarks.bench_crosssize [--repeats 3] [--workdir DIR]

Models: SmolLM2-135M-Instruct's shape (576 channels, 30 layers, 9 query heads in 3 KV groups
of head_dim 64, MLP 1536, vocabulary 49152, tied embeddings) with random float32 weights;
skill = the parent perturbed by 2 % of each tensor's standard deviation; child = the parent
pruned by :func:`mergekit_symalign.crosssize.prune_state_dict` to 432 channels, 2 KV groups,
1152 neurons, layers 9, 20, 21 dropped (27 layers), not retrained. Rows, each a fresh
``mergekit-yaml`` process (imports included), interleaved, median of ``--repeats``:

* plain ``task_arithmetic`` of the child with itself (the child-sized baseline);
* ``symmetry_aligned_task_arithmetic`` of the skill vector onto the child (the cross-size
  transfer: the solve from the weights at plan time, then the merge);
* plain ``task_arithmetic`` of the skill vector at the parent's size (for scale).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_merge.child import run_one
from benchmarks.bench_merge.tables import machine
from examples.common import ALIGNED_TASK_ARITHMETIC, aligned_recipe, plain_transfer_recipe
from tests.support import perturbed

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_theta=100000.0)
CHILD = dict(hidden=432, kv_heads=2, intermediate=1152, drop_layers=(9, 20, 21))


def _save(state, config, path: Path) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False)  # a tied model has no separate lm_head
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def build(workdir: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mergekit_symalign import crosssize as cs

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    parent = AutoModelForCausalLM.from_config(config).state_dict()
    parent = {k: v for k, v in parent.items() if k != "lm_head.weight"}
    skill = perturbed(parent, seed=1)
    child, child_cfg, _ = cs.prune_state_dict(parent, config, **CHILD)
    return {"parent": _save(parent, config, workdir / "parent"),
            "skill": _save(skill, config, workdir / "skill"),
            "child": _save(child, child_cfg, workdir / "child")}


def recipes(paths):
    return {
        "plain task_arithmetic, child + (child - child)":
            plain_transfer_recipe(paths["child"], paths["child"], paths["child"]),
        "aligned cross-size transfer, child + restrict(skill - parent)":
            aligned_recipe(ALIGNED_TASK_ARITHMETIC, paths["child"], paths["parent"], [paths["skill"]]),
        "plain task_arithmetic at the parent's size, parent + (skill - parent)":
            plain_transfer_recipe(paths["parent"], paths["parent"], paths["skill"]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp).resolve()
        t = time.perf_counter()
        paths = build(workdir)
        print(f"models ready in {time.perf_counter() - t:.0f} s", flush=True)
        runs = {name: [] for name in recipes(paths)}
        for _ in range(args.repeats):  # interleaved: drift in the machine's load hits every row
            for name, recipe in recipes(paths).items():
                runs[name].append(run_one(recipe, workdir, []))
    base = statistics.median(r.seconds for r in runs[next(iter(runs))])
    print(f"\nSmolLM2-135M shape, random float32 weights; {machine()}; median of {args.repeats}\n")
    print("| merge | wall s (min–max) | vs plain child merge | peak RSS MiB | peak anonymous MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        secs = [r.seconds for r in rs]
        med = statistics.median(secs)
        print(f"| {name} | {med:.1f} ({min(secs):.1f}–{max(secs):.1f}) | {med / base:.2f}x "
              f"| {statistics.median(r.rss_mib for r in rs):.0f} "
              f"| {statistics.median(r.anon_mib for r in rs):.0f} |")


if __name__ == "__main__":
    main()
