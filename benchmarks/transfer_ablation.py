"""Ablations of the aligned transfer on the demo's real-model family (SmolLM2-135M).

    .venv/bin/python -m benchmarks.transfer_ablation [--workdir demo-output] [--target sibling-scrambled]
        [--threads 2] [--no-docs]

Reuses (or builds) the demo family: reference, arithmetic skill fine-tune, a sibling
fine-tuned on other text, and exact scrambles. Onto every target (or the one given with
--target) it merges the skill vector with plain task arithmetic and with the aligned method
under the paper's switches (permutation / rotation / scaling only, `qk_rotation: full`,
activation alignment) and reports skill accuracy, KL to the skill model, and retention of the
target's own behaviour (mean KL(target || merged) of next-token distributions on held-out
sibling-style text). The reference, skill and sibling models alone are scored for context.
The table and a bar chart go to docs/transfer.md (region `transfer_table`) unless --no-docs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch

from benchmarks import docs_pages
from examples import demo, smollm
from examples.common import mean_kl, run_mergekit_yaml, text_logits, transfer_recipe

VARIANTS = {
    "plain task_arithmetic": None,
    "aligned (all symmetries)": {},
    "permutation only": {"rotation": False, "scaling": False},
    "rotation only": {"permutation": False, "scaling": False},
    "scaling only": {"permutation": False, "rotation": False},
    "qk_rotation: full": {"qk_rotation": "full"},
    "aligned, activations": {"alignment": "activations"},
}
CONTEXT = ("reference", "skill", "sibling")  # scored alone, no merge
RETENTION_TEXTS = 64


def retention_kl(target, merged, tok, texts) -> float:
    """Mean KL(target || merged) of the next-token distributions at every token of ``texts``."""
    return mean_kl(torch.log_softmax(text_logits(target, tok, texts), -1),
                   torch.log_softmax(text_logits(merged, tok, texts), -1))


def slug(name: str) -> str:
    return name.replace(" ", "_").replace(":", "").replace(",", "").replace("(", "").replace(")", "")


def markdown_table(rows) -> str:
    lines = ["| target | variant | skill accuracy | KL to skill | KL(target ‖ merged) on sibling-style text |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        keep = "—" if r["retention_kl"] is None else f"{r['retention_kl']:.4f}"
        lines.append(f"| {r['target']} | {r['variant']} | {r['accuracy']:.3f} | "
                     f"{r['kl_to_skill']:.4f} | {keep} |")
    return "\n".join(lines)


def accuracy_plot(rows, targets, skill_acc) -> str:
    plt = docs_pages.pyplot()
    variants = list(VARIANTS)
    acc = {(r["target"], r["variant"]): r["accuracy"] for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(variants)
    cmap = plt.get_cmap("tab10")
    for i, variant in enumerate(variants):
        xs = [t + (i - (len(variants) - 1) / 2) * width for t in range(len(targets))]
        values = [acc[(t, variant)] for t in targets]
        ax.bar(xs, values, width, label=variant, color=cmap(i))
        for x, v in zip(xs, values):  # a zero bar is otherwise invisible
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", va="bottom", rotation=90, fontsize=7)
    ax.axhline(skill_acc, color="gray", linestyle="--", linewidth=1, zorder=0,
               label=f"skill model alone ({skill_acc:.2f})")
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(targets)
    ax.set_xlabel("target the skill vector is transferred onto")
    ax.set_ylabel("skill accuracy (exact match, fraction)")
    ax.set_ylim(0, 1.1)
    ax.set_title("Skill (2-3 digit addition) transferred onto each target, by merge variant")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return docs_pages.save_figure(fig, "transfer_accuracy.png")


def run_variants(targets, variants, out_dir: Path, tok, problems, skill_logp, texts,
                 keep_merges: bool = False):
    """Merge each target's skill transfer ``{target: (target, reference, skill paths)}`` with
    every variant (recipe parameters; None = mergekit's plain task arithmetic) through
    ``mergekit-yaml``, and score the merged models: rows for the tables."""
    rows = []
    for target, (target_path, reference, skill) in targets.items():
        target_model, _ = smollm.load_pretrained(target_path)
        for name, params in variants.items():
            recipe = transfer_recipe(target_path, reference, skill, params)
            out = out_dir / target / slug(name)
            wall = run_mergekit_yaml(recipe, out_dir / target / f"{slug(name)}.yaml", out).wall_s
            merged, _ = smollm.load_pretrained(out)
            acc, _ = demo.skill_accuracy(merged, tok, problems)
            kl = mean_kl(skill_logp, demo.answer_logprobs(merged, tok, problems))
            keep = retention_kl(target_model, merged, tok, texts)
            rows.append({"target": target, "variant": name, "accuracy": acc, "kl_to_skill": kl,
                         "retention_kl": keep})
            print(f"{target} / {name}: accuracy {acc:.3f}, KL to skill {kl:.4f}, "
                  f"KL(target||merged) {keep:.4f} (merge wall time {wall:.1f} s, not a benchmark)",
                  file=sys.stderr, flush=True)
            del merged
            if not keep_merges:
                shutil.rmtree(out, ignore_errors=True)
        del target_model
    return rows


def demo_family(workdir: str, eval_problems: int, threads: int):
    """The demo's options and its SmolLM2 family's model paths (built once, then reused),
    with torch's threads set and transformers quiet."""
    opts = demo.parse_args(["--workdir", workdir, "--eval-problems", str(eval_problems),
                            "--threads", str(threads)])
    torch.set_num_threads(opts.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return opts, {k: Path(v) for k, v in demo.build_family(opts)["paths"].items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-output")
    parser.add_argument("--target", choices=demo.TARGETS,
                        help="only this target (default: all of %s)" % ", ".join(demo.TARGETS))
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--keep-merges", action="store_true",
                        help="keep the merged weights (default: keep only their recipes)")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    args = parser.parse_args(argv)
    opts, paths = demo_family(args.workdir, args.eval_problems, args.threads)
    targets = [args.target] if args.target else list(demo.TARGETS)
    problems = demo.eval_problems(opts.eval_problems, opts.seed)
    rng = random.Random(1234)
    texts = [demo.sibling_sentence(rng) for _ in range(RETENTION_TEXTS)]
    skill_model, tok = smollm.load_pretrained(paths["skill"])
    skill_logp = demo.answer_logprobs(skill_model, tok, problems)
    del skill_model

    rows = []
    for name in CONTEXT:
        model, _ = smollm.load_pretrained(paths[name])
        acc, _ = demo.skill_accuracy(model, tok, problems)
        kl = mean_kl(skill_logp, demo.answer_logprobs(model, tok, problems))
        rows.append({"target": name, "variant": "(no merge)", "accuracy": acc, "kl_to_skill": kl,
                     "retention_kl": None})
        print(f"{name} alone: accuracy {acc:.3f}, KL to skill {kl:.4f}", file=sys.stderr, flush=True)
        del model
    # For scale (caption): how far the sibling's own fine-tune moved it on this text.
    sibling, _ = smollm.load_pretrained(paths["sibling"])
    reference, _ = smollm.load_pretrained(paths["reference"])
    sibling_vs_reference = retention_kl(sibling, reference, tok, texts)
    del sibling, reference

    out_dir = Path(args.workdir) / "ablation"
    rows += run_variants({t: (paths[t], paths["reference"], paths["skill"]) for t in targets},
                         VARIANTS, out_dir, tok, problems, skill_logp, texts, args.keep_merges)

    skill_acc = next(r["accuracy"] for r in rows if r["target"] == "skill")
    caption = (
        f"Skill: 2-3 digit addition fine-tune of SmolLM2-135M-Instruct, {len(problems)} held-out "
        f"problems (greedy decoding, exact match). KL to skill: mean KL(skill ‖ model) of the "
        f"next-token distributions at the answer positions. KL(target ‖ merged): mean over all "
        f"token positions of {RETENTION_TEXTS} held-out sibling-style English sentences — the "
        f"sibling's fine-tuning text style, used for every target, the reference ones included "
        f"(lower = more of the target's own behaviour kept; for scale, the sibling's own "
        f"fine-tune gives KL(sibling ‖ reference) = {sibling_vs_reference:.4f} on these "
        f"sentences). \"(no merge)\" rows score each model alone. Every merge runs through "
        f"`mergekit-yaml`; torch {torch.__version__}, CPU."
    )
    table = markdown_table(rows)
    print()
    print(caption)
    print()
    print(table)
    (out_dir / "results.json").write_text(json.dumps(
        {"rows": rows, "eval_problems": len(problems), "retention_texts": RETENTION_TEXTS,
         "kl_sibling_vs_reference": sibling_vs_reference}, indent=1))
    if args.no_docs:
        return
    if args.target:
        print(f"\n(--target {args.target}: docs/transfer.md not updated, it shows all targets)")
        return
    image = accuracy_plot(rows, targets, skill_acc)
    path = docs_pages.update_page(
        "transfer.md", "transfer_table",
        f"{caption}\n\n{table}\n\n![Skill accuracy per variant and target]({image})\n")
    print(f"\nwrote {path} and docs/{image}")


if __name__ == "__main__":
    main()
