"""A parent's skill onto its pruned, retrained child, in the toy world (docs/cross-size.md).

    .venv/bin/python -m benchmarks.cross_size [--seeds 2] [--workdir bench-output/cross-size]

Per seed: the paper analog's base → reference → skill models (``paper_analog.build_family``,
cached and shared in layout with it); the **child** = the reference pruned by importance
(``crosssize.prune_state_dict``: 96 of 128 residual channels, 256 of 384 MLP neurons per
layer, heads kept but re-ordered by importance), then retrained on the reference's own data at
several strengths; the child fine-tuned on the skill directly with the parent's skill
schedule. Onto each retrained child it moves ``tau = skill - reference``: by position (first
rows/columns, what a shape-blind tool does), restricted by the maps matched from the weights
(``crosssize.match_child``), by the true pruning indices (the oracle), and the matched one at
larger scales. Scores: exact-match accuracy on held-out problems of the skill (``add``) and of
the child's own tasks (``copy``, ``next``: the reference's), mean ± standard error over seeds;
the index recovery rate. Once (first seed, gentlest child): the other direction, the child's
own fine-tune scattered into the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import paper_analog as pa  # noqa: E402
from benchmarks import docs_pages  # noqa: E402
from benchmarks import toyworld as tw  # noqa: E402
from mergekit_symalign import crosssize as cs  # noqa: E402

BUILD_VERSION = 1
HIDDEN, INTERMEDIATE = 96, 256  # the child's sizes (--child-size); the first probe's
SUFFIX = ""  # folder suffix of children of other sizes than the default
# name -> (steps, lr): retraining on the reference's data (batch 32), gentlest first
STRENGTHS = {"light": (30, 1e-4), "gentle": (100, 3e-4), "medium": (300, 3e-4),
             "hard": (300, 1e-3)}
DEFAULT_STRENGTHS = ("light", "gentle", "hard")  # what one run fits in ~25 min a seed on 2 cores
SCALES = (1.5, 2.0)  # the matched transfer at larger skill-vector scales
OWN = ("copy", "next")  # the child's own tasks (the reference's)


def _load(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _model(config, state):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def _trained(path: Path, note: Dict, build):
    """``build()`` (a model) trained once and saved at ``path``; loaded from there after."""
    marker = path / "build.json"
    if marker.is_file() and json.loads(marker.read_text()) == note:
        return _load(path)
    model = build()
    model.save_pretrained(str(path), safe_serialization=True)
    marker.write_text(json.dumps(note))
    return model


def score(model, problems) -> Dict[str, float]:
    acc = {t: tw.accuracy(model, problems[t]) for t in ("add",) + OWN}
    return {"skill": acc["add"], "own": statistics.mean(acc[t] for t in OWN)}


CEILING = ("child before retraining (reference pruned)",
           "skill model pruned by the same indices (= that + tau)")


def ceiling_rows(root: Path, seed: int, problems) -> List[Dict]:
    """What pruning alone leaves: the reference and the skill model pruned by the child's
    indices, not retrained (the transfer onto the unretrained child is exactly the latter)."""
    reference, skill = _load(root / "reference"), _load(root / "skill")
    ref_sd = reference.state_dict()
    pruned, child_cfg, truth = cs.prune_state_dict(ref_sd, reference.config, hidden=HIDDEN,
                                                   intermediate=INTERMEDIATE)
    skill_pruned = cs.restrict_state_dict(skill.state_dict(), reference.config, truth)
    return [{"seed": seed, "strength": "-", "variant": name, **score(_model(child_cfg, sd), problems)}
            for name, sd in zip(CEILING, (pruned, skill_pruned))]


PROBE = "skill model pruned, then retrained like the child (not a transfer)"
PROBE_STRENGTHS = ("light", "gentle")  # cheap: 30 and 100 steps


def probe_rows(root: Path, seed: int, world, problems, exclude, strengths) -> List[Dict]:
    """Does the skill survive the child's pruning and retraining at all, when it is in the
    weights from the start? The skill model pruned by the child's indices, retrained with the
    child's recipe: an upper bound for a transfer that commutes with the retraining."""
    reference, skill = _load(root / "reference"), _load(root / "skill")
    _, child_cfg, truth = cs.prune_state_dict(reference.state_dict(), reference.config,
                                              hidden=HIDDEN, intermediate=INTERMEDIATE)
    skill_pruned = cs.restrict_state_dict(skill.state_dict(), reference.config, truth)
    rows = []
    for strength in [s for s in strengths if s in PROBE_STRENGTHS]:
        steps, lr = STRENGTHS[strength]

        def retrain():
            model = _model(child_cfg, skill_pruned)
            tw.train(model, tw.mixture(pa.REFERENCE_TASKS, world, 0.2),
                     tw.Schedule(steps, lr, 32), seed + 10, exclude, desc=f"skill pruned {strength}")
            return model

        note = {"version": BUILD_VERSION, "seed": seed, "steps": steps, "lr": lr, "model": "probe",
                "hidden": HIDDEN, "intermediate": INTERMEDIATE}
        model = _trained(root / f"skill-pruned-{strength}{SUFFIX}", note, retrain)
        rows.append({"seed": seed, "strength": strength, "variant": PROBE, **score(model, problems)})
    return rows


SWEEP = ((128, 384), (128, 320), (128, 256), (120, 384), (112, 384), (96, 384), (96, 256))


def sweep_rows(root: Path, seed: int, problems) -> List[Dict]:
    """How much pruning the skill survives without any retraining: the skill model pruned by
    importance to each (residual channels, neurons) of :data:`SWEEP`, scored as is."""
    skill = _load(root / "skill")
    rows = []
    for hidden, intermediate in SWEEP:
        sd, cfg, _ = cs.prune_state_dict(skill.state_dict(), skill.config, hidden=hidden,
                                         intermediate=intermediate)
        rows.append({"seed": seed, "hidden": hidden, "intermediate": intermediate,
                     **score(_model(cfg, sd), problems)})
    return rows


def run_seed(workdir: Path, seed: int, world, problems, exclude, strengths, other_direction,
             scale: float = 1.0, family_from: Path = None):
    root = workdir / f"seed{seed}"
    if family_from is not None:  # share another workdir's trained parent models
        root.mkdir(parents=True, exist_ok=True)
        for name in ("base", "reference", "skill"):
            if not (root / name).exists():
                (root / name).symlink_to(family_from / f"seed{seed}" / name)
    t0 = time.perf_counter()
    paths = pa.build_family(root, seed, scale, world, exclude, models=("base", "reference", "skill"))
    reference, skill = _load(paths["reference"]), _load(paths["skill"])
    ref_sd, skill_sd = reference.state_dict(), skill.state_dict()
    config = reference.config
    pruned, child_cfg, truth = cs.prune_state_dict(ref_sd, config, hidden=HIDDEN,
                                                   intermediate=INTERMEDIATE)
    rows = [{"seed": seed, "strength": "-", "variant": name, **score(m, problems)}
            for name, m in (("reference (parent)", reference), ("skill model (parent + tau)", skill))]
    rows += ceiling_rows(root, seed, problems)
    print(f"seed {seed}: parent skill {rows[1]['skill']:.2f}, own {rows[1]['own']:.2f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for strength in strengths:
        steps, lr = STRENGTHS[strength]
        steps = max(1, round(steps * scale))
        note = {"version": BUILD_VERSION, "seed": seed, "steps": steps, "lr": lr, "scale": scale,
                "hidden": HIDDEN, "intermediate": INTERMEDIATE}

        def retrain():
            model = _model(child_cfg, pruned)
            tw.train(model, tw.mixture(pa.REFERENCE_TASKS, world, 0.2),
                     tw.Schedule(steps, lr, 32), seed + 10, exclude, desc=f"child {strength}")
            return model

        child = _trained(root / f"child-{strength}{SUFFIX}", {**note, "model": "child"}, retrain)
        child_sd = child.state_dict()

        def direct():
            model = _model(child_cfg, child_sd)
            tw.train(model, tw.mixture(pa.SKILL_TASKS), pa.schedules(scale)["skill"], seed + 2,
                     exclude, desc=f"child {strength} + skill")
            return model

        tuned = _trained(root / f"child-{strength}{SUFFIX}-skill", {**note, "model": "direct"}, direct)
        t = time.perf_counter()
        match = cs.match_child(ref_sd, config, child_sd, child_cfg)
        match_s = time.perf_counter() - t
        recovery = match.map.recovery(truth)
        explained = cs.explained(child_sd, ref_sd, config, truth)
        variants = {
            "child": child_sd,
            "child + tau by position": cs.by_position(child_sd, ref_sd, skill_sd),
            "child + tau, matched": cs.transfer(child_sd, ref_sd, skill_sd, config, match.map),
            "child + tau, oracle indices": cs.transfer(child_sd, ref_sd, skill_sd, config, truth),
            **{f"child + {s:g} tau, matched": cs.transfer(child_sd, ref_sd, skill_sd, config,
                                                          match.map, scale=s) for s in SCALES},
            "child fine-tuned on the skill": tuned.state_dict(),
        }
        extra = {"recovery": recovery, "match_s": match_s, "worst_cosine": match.worst(),
                 "explained": statistics.mean(explained.values())}
        for name, state in variants.items():
            row = {"seed": seed, "strength": strength, "variant": name,
                   **score(_model(child_cfg, state), problems), **extra}
            rows.append(row)
            print(f"  seed {seed} {strength:>6} | {name:<32} skill {row['skill']:.2f} "
                  f"own {row['own']:.2f}", flush=True)
        print(f"  seed {seed} {strength}: recovery {recovery}, worst matched cosine "
              f"{match.worst():.3f}, explained {extra['explained']:.3f}, match {match_s:.1f} s",
              flush=True)
        if other_direction and strength == strengths[0]:
            up = cs.scatter(ref_sd, child_sd, tuned.state_dict(), config, match.map)
            rows.append({"seed": seed, "strength": strength, "variant":
                         "parent + child's tau scattered (other direction)",
                         **score(_model(config, up), problems)})
            print(f"  other direction: {rows[-1]}", flush=True)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


mean_se = pa.mean_se  # "mean ± standard error", as the paper analog's tables


def tables(rows: List[Dict], strengths) -> str:
    out = ["| model | skill: add | own: copy, next |", "|---|---:|---:|"]
    for r in dict.fromkeys(r["variant"] for r in rows if r["strength"] == "-"):
        sel = [x for x in rows if x["variant"] == r]
        out.append(f"| {r} | {mean_se([x['skill'] for x in sel])} | {mean_se([x['own'] for x in sel])} |")
    for strength in strengths:
        steps, lr = STRENGTHS[strength]
        sel = [r for r in rows if r["strength"] == strength]
        if not sel:
            continue
        n = len({r["seed"] for r in sel})
        out += ["", f"**Child retrained {steps} steps at lr {lr:g}** ({strength}; {n} "
                f"seed{'s' if n > 1 else ''}):", "",
                "| model | skill: add | own: copy, next |", "|---|---:|---:|"]
        for variant in dict.fromkeys(r["variant"] for r in sel):
            vs = [r for r in sel if r["variant"] == variant]
            out.append(f"| {variant} | {mean_se([r['skill'] for r in vs])} | "
                       f"{mean_se([r['own'] for r in vs])} |")
        per_seed = {}
        for r in sel:
            per_seed.setdefault(r["seed"], {})[r["variant"]] = r
        gains = []
        for s, v in per_seed.items():
            direct = v["child fine-tuned on the skill"]["skill"] - v["child"]["skill"]
            matched = v["child + tau, matched"]["skill"] - v["child"]["skill"]
            gains.append((matched, direct))
        first = next(r for r in sel if "recovery" in r)
        rec = {k: mean_se([r["recovery"][k] for r in sel if r["variant"] == "child"])
               for k in first["recovery"]}
        out += ["", "Matched gain / direct fine-tune's gain: "
                + ", ".join(f"{m:.2f}/{d:.2f}" for m, d in gains)
                + f" (per seed). Index recovery (share equal to the true pruning indices): "
                + ", ".join(f"{k} {v}" for k, v in rec.items())
                + f". Weakest matched mean cosine {mean_se([r['worst_cosine'] for r in sel if r['variant'] == 'child'])}; "
                f"share of the child's weights the restricted parent explains "
                f"{mean_se([r['explained'] for r in sel if r['variant'] == 'child'])}; "
                f"matching {mean_se([r['match_s'] for r in sel if r['variant'] == 'child'])} s."]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only-seeds", default=None,
                    help="comma-separated seeds to run (e.g. two processes in parallel); each run "
                         "saves its own results file and --from-results reports them all")
    ap.add_argument("--workdir", default="bench-output/cross-size")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems per task")
    ap.add_argument("--strengths", default=",".join(DEFAULT_STRENGTHS),
                    help=f"comma-separated, of {', '.join(STRENGTHS)}")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads ran 10x slower)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every training schedule's steps (e.g. 0.02 for a smoke run)")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--from-results", action="store_true",
                    help="report the workdir's saved results (no training but --probe's)")
    ap.add_argument("--child-size", default=None,
                    help="residual channels,MLP neurons kept (default 96,256); other sizes get "
                         "their own folders, results files and docs region")
    ap.add_argument("--family-from", default=None,
                    help="another workdir whose trained base/reference/skill models to reuse")
    ap.add_argument("--sweep", action="store_true",
                    help="with --from-results: the skill model pruned to several sizes, no retraining")
    ap.add_argument("--probe", action="store_true",
                    help=f"with --from-results: add '{PROBE}' for {', '.join(PROBE_STRENGTHS)}")
    args = ap.parse_args(argv)
    global HIDDEN, INTERMEDIATE, SUFFIX
    if args.child_size:
        HIDDEN, INTERMEDIATE = (int(x) for x in args.child_size.split(","))
        SUFFIX = f"-{HIDDEN}x{INTERMEDIATE}"
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    strengths = args.strengths.split(",")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    world = tw.World()
    # the paper analog's held-out sets (200 per task) stay out of every training run
    held = {t: tw.held_out(t, 200) for t in tw.TASKS}
    exclude = {p for exs in held.values() for p, _ in exs}
    problems = {t: exs[: args.problems] for t, exs in held.items()}
    start = time.perf_counter()
    seeds = ([int(x) for x in args.only_seeds.split(",")] if args.only_seeds
             else list(range(args.seeds)))
    results = workdir / f"results{SUFFIX}-{'-'.join(map(str, seeds))}.json"
    if args.from_results:
        rows, wall = [], 0.0
        import re

        mine = re.compile(rf"results{re.escape(SUFFIX)}(-\d+)+\.json")  # not other sizes'
        for path in sorted(p for p in workdir.glob("results*.json") if mine.fullmatch(p.name)):
            saved = json.loads(path.read_text())
            rows += saved["rows"]
            wall = max(wall, saved["wall_s"])
        for seed in sorted({r["seed"] for r in rows}):  # results saved before these rows existed
            if not any(r["seed"] == seed and r["variant"] == CEILING[0] for r in rows):
                rows += ceiling_rows(workdir / f"seed{seed}", seed, problems)
            if args.probe and not any(r["seed"] == seed and r["variant"] == PROBE for r in rows):
                done = {r["strength"] for r in rows if r["seed"] == seed}
                rows += probe_rows(workdir / f"seed{seed}", seed, world, problems, exclude,
                                   [s for s in strengths if s in done])
    else:
        rows = []
        for seed in seeds:
            rows += run_seed(workdir, seed, world, problems, exclude, strengths, seed == 0,
                             args.scale, Path(args.family_from).resolve() if args.family_from
                             else None)
            wall = time.perf_counter() - start  # saved after every seed: a cut run still reports
            results.write_text(json.dumps({"rows": rows, "wall_s": wall},
                                                             indent=1))
    sweep = []
    if args.sweep:
        for seed in sorted({r["seed"] for r in rows}):
            sweep += sweep_rows(workdir / f"seed{seed}", seed, problems)
    seeds = len({r["seed"] for r in rows})
    header = (f"{seeds} seeds, mean ± standard error; {args.problems} held-out problems per task "
              f"(greedy, exact match). Parent: the paper analog's reference (Llama, 4 layers, "
              f"hidden 128, GQA 4/2, MLP 384); child: {HIDDEN} channels and {INTERMEDIATE} "
              f"neurons per layer kept by importance, heads re-ordered. Regenerate: "
              f"`.venv/bin/python -m benchmarks.cross_size --seeds {seeds}"
              f"{f' --child-size {HIDDEN},{INTERMEDIATE}' if SUFFIX else ''} --strengths "
              f"{','.join(strengths)}` (the longest of the saved runs: "
              f"{wall / 60:.0f} min on a shared 2-core x86_64 CPU, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}).")
    text = header + "\n\n" + tables(rows, strengths)
    other = [r for r in rows if "other direction" in r["variant"]]
    if other:
        text += ("\n\nThe other direction (seed 0, child retrained "
                 f"{other[0]['strength']}): the child's own skill fine-tune scattered into the "
                 f"parent (zeros elsewhere): skill {other[0]['skill']:.2f}, own "
                 f"{other[0]['own']:.2f}.")
    if sweep:
        text += ("\n\nHow much pruning the skill survives with no retraining at all (the skill "
                 "model pruned by importance, pruned only by residual channels and/or neurons; "
                 f"{len({r['seed'] for r in sweep})} seed(s)):\n\n"
                 "| residual channels kept | MLP neurons kept | skill: add | own: copy, next |\n"
                 "|---:|---:|---:|---:|")
        for hidden, intermediate in SWEEP:
            sel = [r for r in sweep if (r["hidden"], r["intermediate"]) == (hidden, intermediate)]
            text += (f"\n| {hidden} / 128 | {intermediate} / 384 | "
                     f"{mean_se([r['skill'] for r in sel])} | {mean_se([r['own'] for r in sel])} |")
    print(text)
    if not args.no_docs:
        docs_pages.update_page("cross-size.md", f"cross_size{SUFFIX.replace('-', '_')}", text)
        print("wrote docs/cross-size.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
