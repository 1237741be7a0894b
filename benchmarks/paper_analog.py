"""The paper's transfer table, rebuilt from scratch on a toy world small enough for a CPU.

    .venv/bin/python -m benchmarks.paper_analog [--seeds 3] [--workdir bench-output/paper-analog]

For each seed it trains (see ``toyworld.py``; cached under ``--workdir``):

* **base**: pre-trained from a random initialisation on the world's text, 30 % of which is
  instruction-style examples of every task but the skill;
* **reference**: base instruction-tuned on ``copy`` and ``next`` (the "Llama-Instruct");
* **skill**: reference fine-tuned on ``add`` (the "Nemotron": a new skill on top of it);
* **target**: base instruction-tuned independently, longer and on other data — ``copy``,
  ``next``, plus its own tasks ``rev`` and ``sort`` (the "Tulu 3");
* **target, other init**: the same recipe as target, but from a base pre-trained from a
  different random initialisation (no shared ancestor with the reference);
* **target, scrambled**: the target moved by a random element of its exact symmetry group
  (same function, other coordinates).

Onto both targets it transfers τ = skill − reference with mergekit's plain
``task_arithmetic`` (target + τ) and with ``symmetry_aligned_task_arithmetic`` (weights,
activations, and the paper's ablations), then scores every model on held-out problems of the
skill and of the target's own tasks, and reports mean ± standard error over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import docs_pages  # noqa: E402
from benchmarks import toyworld as tw  # noqa: E402
from examples.common import mean_kl, transfer_recipe  # noqa: E402
from tests.support import run_recipe  # noqa: E402

BUILD_VERSION = 2  # bump when the recipes below change: invalidates cached models

# Pre-training text carries some instruction-style examples (not of the skill), as web text
# does: instruction tuning then sharpens what the base half knows, and the fine-tunes stay
# small enough (6-10 % relative distance) for task arithmetic to mean something.
PRETRAINING_TASKS = {"copy": 1.0, "rev": 1.0, "sort": 1.0, "next": 1.0}
PRETRAINING_INSTRUCTIONS = 0.3
REFERENCE_TASKS = {"copy": 1.0, "next": 1.0}
SKILL_TASKS = {"add": 1.0, "copy": 0.1, "next": 0.1}  # a little replay keeps the format
TARGET_TASKS = {"copy": 1.0, "next": 1.0, "rev": 1.5, "sort": 1.5}
OWN_TASKS = ("rev", "sort")  # the target's own skills, unknown to the reference
SHARED_TASKS = ("copy", "next")

VARIANTS = {  # name -> (folder, None for plain task arithmetic or the aligned method's parameters)
    "target + τ (plain task arithmetic)": ("plain", None),
    "target(w.align) + τ": ("weights", {}),
    "target(act.align) + τ": ("activations", {"alignment": "activations"}),
    "permutation only": ("permutation-only", {"rotation": False, "scaling": False}),
    "rotation only": ("rotation-only", {"permutation": False, "scaling": False}),
    "scaling only": ("scaling-only", {"permutation": False, "rotation": False}),
    "qk_rotation: full": ("qk-full", {"qk_rotation": "full"}),
}
SETTINGS = {"same base": "target", "same base, scrambled": "target-scrambled",
            "other init": "target-other-init"}
ABLATIONS = ("permutation only", "rotation only", "scaling only", "qk_rotation: full")


def schedules(scale: float) -> Dict[str, tw.Schedule]:
    s = lambda steps, lr: tw.Schedule(max(1, round(steps * scale)), lr, 32)  # noqa: E731
    return {"base": s(800, 2e-3), "reference": s(300, 3e-4), "skill": s(500, 3e-4),
            "target": s(700, 3e-4)}


# --------------------------------------------------------------------------- the family


FAMILY = ("base", "reference", "skill", "target", "base-other-init", "target-other-init",
          "target-scrambled")


def build_family(root: Path, seed: int, scale: float, world: tw.World, exclude: set,
                 config=None, models: Sequence[str] = FAMILY) -> Dict[str, Path]:
    """Train (or reuse) one seed's models; every model is a saved Llama checkpoint.

    ``config``: the models' ``LlamaConfig`` (default :func:`toyworld.model_config`, the
    paper analog's); ``models``: build only these (a parent must be among them or cached)."""
    from transformers import LlamaForCausalLM

    plan = schedules(scale)
    paths = {n: root / n for n in FAMILY}
    note = {"version": BUILD_VERSION, "seed": seed, "scale": scale}
    shape = lambda c: {k: getattr(c, k) for k in (  # noqa: E731
        "hidden_size", "intermediate_size", "num_hidden_layers")}
    if config is not None and shape(config) != shape(tw.model_config()):
        note["shape"] = shape(config)  # other shapes are cached apart; old caches stay valid

    def cached(name):
        marker = paths[name] / "build.json"
        return marker.is_file() and json.loads(marker.read_text()) == {**note, "model": name}

    def save(model, name, losses):
        model.save_pretrained(str(paths[name]), safe_serialization=True)
        tw.save_tokenizer(paths[name])
        (paths[name] / "build.json").write_text(json.dumps({**note, "model": name}))
        done = f"final loss {statistics.mean(losses[-20:]):.3f}" if losses else "built"
        print(f"  seed {seed} {name}: {done}", flush=True)

    def load(name):
        return LlamaForCausalLM.from_pretrained(str(paths[name]), dtype=torch.float32).eval()

    pretraining = tw.mixture(PRETRAINING_TASKS, world, 1 - PRETRAINING_INSTRUCTIONS)
    jobs = [  # name, parent (None: fresh init with that seed), sampler, schedule, train seed
        ("base", seed, pretraining, plan["base"], seed),
        ("reference", "base", tw.mixture(REFERENCE_TASKS, world, 0.2), plan["reference"], seed + 1),
        ("skill", "reference", tw.mixture(SKILL_TASKS), plan["skill"], seed + 2),
        ("target", "base", tw.mixture(TARGET_TASKS, world, 0.2), plan["target"], seed + 3),
        ("base-other-init", seed + 500, pretraining, plan["base"], seed + 4),
        ("target-other-init", "base-other-init", tw.mixture(TARGET_TASKS, world, 0.2),
         plan["target"], seed + 3),
    ]
    for name, parent, sample, schedule, train_seed in jobs:
        if name not in models or cached(name):
            continue
        if isinstance(parent, int):
            torch.manual_seed(parent)
            model = LlamaForCausalLM(config if config is not None else tw.model_config())
        else:
            model = load(parent)
        losses = tw.train(model, sample, schedule, train_seed, exclude, desc=f"seed {seed} {name}")
        save(model, name, losses)
    if "target-scrambled" in models and not cached("target-scrambled"):
        # The target moved by a random element of its exact symmetry group: the same
        # function in other coordinates (what an independent training run may well produce).
        from mergekit_symalign.statedict import scramble_state_dict

        model = load("target")
        state, _ = scramble_state_dict(model.state_dict(), model.config, seed=seed + 900)
        model.load_state_dict(state)
        save(model, "target-scrambled", [])
    return paths


def write_calibration(path: Path, world: tw.World, lines: int = 400) -> Path:
    """Calibration text in the models' own language: raw text and instructions, no answers."""
    import random

    rng = random.Random(4321)
    sample = tw.mixture({t: 1.0 for t in tw.TASKS}, world, 0.5)
    rows = []
    for _ in range(lines):
        prompt, completion = sample(rng)
        rows.append((prompt + completion).strip())
    path.write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------- merges


def recipe(params, target: Path, reference: Path, skill: Path, calibration: Path) -> Dict:
    """Plain task arithmetic (``params`` None) or the aligned method with ``params``; activation
    alignment reads the toy world's calibration text."""
    if params is not None and params.get("alignment") == "activations":
        params = dict(params, calibration=str(calibration), calibration_samples=400,
                      calibration_max_tokens=64)
    return transfer_recipe(target, reference, skill, params)


# --------------------------------------------------------------------------- scoring


def score(path: Path, problems: Dict[str, list], skill_logp, target_logp) -> Dict[str, float]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    acc = {t: tw.accuracy(model, problems[t]) for t in tw.TASKS}
    row = {
        "skill": acc["add"],
        "own": statistics.mean(acc[t] for t in OWN_TASKS),
        "shared": statistics.mean(acc[t] for t in SHARED_TASKS),
        **{f"acc_{t}": a for t, a in acc.items()},
    }
    if skill_logp is not None:
        row["kl_skill"] = mean_kl(skill_logp, tw.completion_logprobs(model, problems["add"]))
    if target_logp is not None:
        own = [ex for t in OWN_TASKS for ex in problems[t]]
        row["kl_target"] = mean_kl(target_logp, tw.completion_logprobs(model, own))
    return row


def run_seed(workdir: Path, seed: int, scale: float, world, problems, exclude) -> List[Dict]:
    root = workdir / f"seed{seed}"
    t0 = time.perf_counter()
    paths = build_family(root, seed, scale, world, exclude)
    build_s = time.perf_counter() - t0
    calibration = write_calibration(root / "calibration.txt", world)
    from transformers import LlamaForCausalLM

    def logp(name, tasks):
        model = LlamaForCausalLM.from_pretrained(str(paths[name]), dtype=torch.float32).eval()
        return tw.completion_logprobs(model, [ex for t in tasks for ex in problems[t]])

    skill_logp = logp("skill", ["add"])
    rows = []
    for name in ("reference", "skill"):
        rows.append({"seed": seed, "setting": "models", "variant": name,
                     **score(paths[name], problems, skill_logp, None)})
    for setting, target in SETTINGS.items():
        target_logp = logp(target, OWN_TASKS)
        rows.append({"seed": seed, "setting": setting, "variant": "target",
                     **score(paths[target], problems, skill_logp, target_logp)})
        for variant, (folder, params) in VARIANTS.items():
            t = time.perf_counter()
            out = run_recipe(recipe(params, paths[target], paths["reference"], paths["skill"],
                                    calibration),
                             root / "merges" / f"{target}--{folder}", lazy_unpickle=False)
            wall = time.perf_counter() - t
            row = {"seed": seed, "setting": setting, "variant": variant, "merge_s": wall,
                   **score(out, problems, skill_logp, target_logp)}
            rows.append(row)
            print(f"  seed {seed} {setting:>10} | {variant:<36} skill {row['skill']:.2f} "
                  f"own {row['own']:.2f} shared {row['shared']:.2f} KL(skill) {row['kl_skill']:.3f} "
                  f"KL(target) {row['kl_target']:.3f}", flush=True)
    print(f"seed {seed}: family {build_s:.0f} s, total {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


# --------------------------------------------------------------------------- report


def mean_se(values: List[float]) -> str:
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:.2f}"
    return f"{m:.2f} ± {statistics.stdev(values) / math.sqrt(len(values)):.2f}"


ORDER = ["reference", "skill", "target", *VARIANTS]


def table(rows: List[Dict], setting: str) -> str:
    lines = ["| model | skill: add | target's own: rev, sort | shared: copy, next | "
             "KL(skill ‖ ·) on add | KL(target ‖ ·) on own |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant in ORDER:
        sel = [r for r in rows if r["variant"] == variant
               and (r["setting"] == setting or (r["setting"] == "models" and setting == "same base"))]
        if not sel:
            continue
        cells = [mean_se([r[k] for r in sel]) if k in sel[0] else "" for k in
                 ("skill", "own", "shared", "kl_skill", "kl_target")]
        indent = "&nbsp;&nbsp;ablation: " if variant in ABLATIONS else ""
        lines.append(f"| {indent}{variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], seeds: int) -> str:
    plt = docs_pages.pyplot()
    variants = ["target", *VARIANTS]
    titles = {"same base": "target from the reference's base (the paper's setting)",
              "same base, scrambled": "that target under a random exact symmetry",
              "other init": "target from a different random init"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    width = 0.38
    for ax, setting in zip(axes, SETTINGS):
        for k, (key, label, colour) in enumerate((("skill", "skill (add)", "tab:blue"),
                                                  ("own", "target's own (rev, sort)", "tab:orange"))):
            means, errs = [], []
            for v in variants:
                vals = [r[key] for r in rows if r["setting"] == setting and r["variant"] == v]
                means.append(statistics.mean(vals))
                errs.append(statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0)
            xs = [i + (k - 0.5) * width for i in range(len(variants))]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=label, color=colour)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([v.replace(" + τ", "+τ").replace(" (plain task arithmetic)", "\n(plain TA)")
                            for v in variants], rotation=35, ha="right", fontsize=8)
        ax.set_title(titles[setting], fontsize=10)
        skill_alone = [r["skill"] for r in rows if r["variant"] == "skill"]
        ax.axhline(statistics.mean(skill_alone), color="tab:blue", ls="--", lw=1,
                   label="skill model alone (add)")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"exact-match accuracy (mean ± SE, {seeds} seeds)")
    axes[0].legend(loc="upper left", fontsize=8)
    return docs_pages.save_figure(fig, "paper_analog_accuracy.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workdir", default="bench-output/paper-analog")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every training schedule's steps (e.g. 0.05 for a smoke run)")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print only; don't rewrite docs/")
    ap.add_argument("--from-results", action="store_true",
                    help="don't train or merge: report the workdir's saved results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    workdir = Path(args.workdir).resolve()
    world = tw.World()
    problems = {t: tw.held_out(t, args.problems) for t in tw.TASKS}
    exclude = {p for exs in problems.values() for p, _ in exs}
    start = time.perf_counter()
    rows: List[Dict] = []
    if args.from_results:
        saved = json.loads((workdir / "results.json").read_text())
        rows, wall = saved["rows"], saved["wall_s"]
        args.seeds = len({r["seed"] for r in rows})
    else:
        for seed in range(args.seeds):
            rows += run_seed(workdir, seed, args.scale, world, problems, exclude)
        wall = time.perf_counter() - start
        (workdir / "results.json").write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=1))
    plan = schedules(args.scale)
    header = (
        f"{args.seeds} seeds, mean ± standard error; {args.problems} held-out problems per task "
        f"(greedy decoding, exact match). Llama {tw.model_config().num_hidden_layers} layers, "
        f"hidden {tw.model_config().hidden_size}, GQA 4/2 heads, MLP "
        f"{tw.model_config().intermediate_size}; training steps (batch 32): "
        + ", ".join(f"{k} {v.steps}" for k, v in plan.items())
        + f". Regenerate: `.venv/bin/python -m benchmarks.paper_analog --seeds {args.seeds}` "
        f"(this run: {wall / 60:.0f} min on 2 CPU cores; models already trained in the workdir "
        f"are reused, a seed from scratch trains for about 9 min)."
    )
    text = [header, "", "**Target from the same base as the reference** (the paper's setting):", "",
            table(rows, "same base"), "",
            "**The same target under a random exact symmetry** (same function as the target "
            "above, other coordinates):", "", table(rows, "same base, scrambled"), "",
            "**Target from a different random initialisation** (no common ancestor):", "",
            table(rows, "other init")]
    print("\n".join(text))
    if not args.no_docs:
        image = plot(rows, args.seeds)
        text += ["", f"![accuracy per variant]({image})"]
        docs_pages.update_page("paper-analog.md", "paper_analog", "\n".join(text))
        print(f"wrote docs/paper-analog.md and docs/{image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
