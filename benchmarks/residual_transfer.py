"""The aligned transfer onto targets whose residual stream and attention heads moved too
(issue 10's real-model evidence), on the demo's SmolLM2-135M family.

    .venv/bin/python -m benchmarks.residual_transfer [--workdir demo-output] [--threads 2] [--no-docs]

Targets, built once from the demo family (under WORKDIR/residual/):

* ``reference-residual`` / ``sibling-residual``: the reference / the sibling fine-tune moved
  by a random element of the whole exact group: every layer's symmetries, the attention heads
  and a signed permutation of the residual stream (tied embeddings, as SmolLM2 ships);
* ``reference-rotated`` / ``sibling-rotated``: the same models untied (lm_head a copy of the
  embeddings: same function), every norm folded into its readers and the residual stream
  rotated by a random orthogonal matrix (a QuaRot/SliceGPT-style checkpoint), plus every layer
  symmetry. The transfers onto them use the untied reference and skill (same functions).

Variants: plain task arithmetic; today's layer alignment (``residual: none``); ``residual:
permutation`` / ``orthogonal`` (output in the base's and in the reference's coordinates);
activation alignment with the residual stream. Table and chart: docs/transfer.md, region
``residual_table``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from benchmarks import docs_pages
from benchmarks import transfer_ablation as ablation
from examples import demo, smollm
from examples.common import mean_kl

SEEDS = {"reference": 301, "sibling": 302}
PERMUTED = {
    "plain task_arithmetic": None,
    "aligned, residual: none": {},
    "aligned, residual: permutation": {"residual": "permutation"},
    "same, reference frame": {"residual": "permutation", "output_frame": "reference"},
    "activations, residual: permutation": {"residual": "permutation", "alignment": "activations"},
}
ROTATED = {
    "plain task_arithmetic": None,
    "aligned, residual: none": {},
    "aligned, residual: permutation": {"residual": "permutation"},
    "aligned, residual: orthogonal": {"residual": "orthogonal"},
    "same, reference frame": {"residual": "orthogonal", "output_frame": "reference"},
    "activations, residual: orthogonal": {"residual": "orthogonal", "alignment": "activations"},
}


def untied(src: Path, dst: Path) -> Path:
    """``src`` with its embeddings untied (lm_head a copy of them): the same function."""
    import transformers

    if smollm.is_saved(dst):
        return dst
    model, tok = smollm.load_pretrained(src)
    config = model.config.__class__.from_dict({**model.config.to_dict(), "tie_word_embeddings": False})
    out = transformers.AutoModelForCausalLM.from_config(config)
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    out.load_state_dict(state)
    return smollm.save_pretrained(out, tok, dst, note="untied copy\n")


def scrambled(src: Path, dst: Path, seed: int, residual: str) -> Path:
    from mergekit_symalign.statedict import scramble_state_dict

    if smollm.is_saved(dst):
        return dst
    model, tok = smollm.load_pretrained(src)
    moved, _ = scramble_state_dict(model.state_dict(), model.config, seed=seed, residual=residual)
    model.load_state_dict(moved)
    return smollm.save_pretrained(model, tok, dst, note=f"{residual} scramble, seed {seed}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-output")
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    opts, paths = ablation.demo_family(args.workdir, args.eval_problems, args.threads)
    work = Path(args.workdir) / "residual"
    models = {name: untied(paths[name], work / f"{name}-untied") for name in ("reference", "skill", "sibling")}
    targets = {}
    for name in ("reference", "sibling"):
        targets[f"{name}-residual"] = (
            scrambled(paths[name], work / f"{name}-residual", SEEDS[name], "permutation"),
            paths["reference"], paths["skill"])
    rotated = {}
    for name in ("reference", "sibling"):
        rotated[f"{name}-rotated"] = (
            scrambled(models[name], work / f"{name}-rotated", SEEDS[name], "orthogonal"),
            models["reference"], models["skill"])

    problems = demo.eval_problems(opts.eval_problems, opts.seed)
    rng = random.Random(1234)
    texts = [demo.sibling_sentence(rng) for _ in range(ablation.RETENTION_TEXTS)]
    skill_model, tok = smollm.load_pretrained(paths["skill"])
    skill_logp = demo.answer_logprobs(skill_model, tok, problems)
    del skill_model
    rows = []
    for name in ("skill", "sibling"):
        model, _ = smollm.load_pretrained(paths[name])
        acc, _ = demo.skill_accuracy(model, tok, problems)
        rows.append({"target": name, "variant": "(no merge)", "accuracy": acc,
                     "kl_to_skill": mean_kl(skill_logp, demo.answer_logprobs(model, tok, problems)),
                     "retention_kl": None})
        del model
    rows += ablation.run_variants(targets, PERMUTED, work / "merges", tok, problems, skill_logp, texts)
    rows += ablation.run_variants(rotated, ROTATED, work / "merges", tok, problems, skill_logp, texts)
    caption = (
        f"Skill: the demo's addition fine-tune of SmolLM2-135M-Instruct, {len(problems)} held-out "
        f"problems. `-residual` targets: a random element of the whole exact group (every layer "
        f"symmetry, the attention heads, a signed permutation of the residual stream). "
        f"`-rotated` targets: untied, every norm folded into its readers, the residual stream "
        f"rotated by a random orthogonal matrix, plus every layer symmetry; their transfers use "
        f"the untied reference and skill (same functions). Columns as in the ablation table above. "
        f"Every merge runs through `mergekit-yaml`; torch {torch.__version__}, CPU."
    )
    table = ablation.markdown_table(rows)
    print(f"\n{caption}\n\n{table}")
    (work / "results.json").write_text(json.dumps({"rows": rows}, indent=1))
    if not args.no_docs:
        path = docs_pages.update_page("transfer.md", "residual_table", f"{caption}\n\n{table}\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
