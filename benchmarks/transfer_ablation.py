"""Ablations of the aligned transfer on the demo's real-model family (SmolLM2-135M).

    .venv/bin/python benchmarks/transfer_ablation.py [--workdir demo-output] [--target sibling-scrambled]

Reuses (or builds) the demo family: reference, arithmetic skill fine-tune, a sibling
fine-tuned on other text, and exact scrambles. Onto one target it merges the skill vector
with plain task arithmetic and with the aligned method under the paper's switches
(permutation / rotation / scaling only, `qk_rotation: full`, activation alignment) and reports
skill accuracy, KL to the skill model, and retention of the target's own behaviour
(mean KL(target || merged) of next-token distributions on held-out sibling-style text).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from mergekit_symalign import demo, smollm

VARIANTS = {
    "plain task_arithmetic": None,
    "aligned (all symmetries)": {},
    "permutation only": {"rotation": False, "scaling": False},
    "rotation only": {"permutation": False, "scaling": False},
    "scaling only": {"permutation": False, "rotation": False},
    "qk_rotation: full": {"qk_rotation": "full"},
    "aligned, activations": {"alignment": "activations"},
}


def retention_kl(target, merged, tok, texts) -> float:
    enc = tok(list(texts), return_tensors="pt", padding=True)
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        lt = torch.log_softmax(target(**enc).logits[keep], -1)
        lm = torch.log_softmax(merged(**enc).logits[keep], -1)
    return float((lt.exp() * (lt - lm)).sum(-1).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-output")
    parser.add_argument("--target", default="sibling-scrambled", choices=demo.TARGETS)
    parser.add_argument("--eval-problems", type=int, default=100)
    args = parser.parse_args(argv)
    opts = demo.parse_args(["--workdir", args.workdir, "--eval-problems", str(args.eval_problems)])
    torch.set_num_threads(opts.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    paths = {k: Path(v) for k, v in demo.build_family(opts)["paths"].items()}
    problems = demo.eval_problems(opts.eval_problems, opts.seed)
    rng = random.Random(1234)
    texts = [demo.sibling_sentence(rng) for _ in range(64)]
    skill_model, tok = smollm.load_pretrained(paths["skill"])
    skill_logp = demo.answer_logprobs(skill_model, tok, problems)
    target_model, _ = smollm.load_pretrained(paths[args.target])
    out_dir = Path(args.workdir) / "ablation"
    rows = []
    for name, params in VARIANTS.items():
        method = "task_arithmetic" if params is None else "symmetry_aligned_task_arithmetic"
        recipe = demo.recipe(method, paths[args.target], paths["reference"], paths["skill"])
        if params:
            recipe["parameters"] = params
        slug = name.replace(" ", "_").replace(":", "").replace(",", "").replace("(", "").replace(")", "")
        wall = demo.run_merge(recipe, out_dir / f"{slug}.yaml", out_dir / slug, verbose=False)
        merged, _ = smollm.load_pretrained(out_dir / slug)
        acc, _ = demo.skill_accuracy(merged, tok, problems)
        kl = demo.mean_kl(skill_logp, demo.answer_logprobs(merged, tok, problems))
        keep = retention_kl(target_model, merged, tok, texts)
        rows.append((name, acc, kl, keep, wall))
        print(f"{name}: accuracy {acc:.3f}, KL to skill {kl:.4f}, KL(target||merged) {keep:.4f}, "
              f"{wall:.1f} s", file=sys.stderr)
        del merged
    print(f"\nTarget: {args.target}; skill: arithmetic fine-tune of SmolLM2-135M-Instruct; "
          f"{len(problems)} held-out problems\n")
    print("| variant | skill accuracy | KL to skill | KL(target ‖ merged) on target-style text | merge time (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, acc, kl, keep, wall in rows:
        print(f"| {name} | {acc:.3f} | {kl:.4f} | {keep:.4f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
