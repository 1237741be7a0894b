"""What carries a parent's skill across its pruned child's drift? (toy world, docs/cross-size.md)

    .venv/bin/python -m benchmarks.cross_size --seeds 3 --child-size 128,320 --strengths light,gentle
    .venv/bin/python -m benchmarks.cross_size_drift --seeds 3

Reuses the models ``benchmarks.cross_size`` trained and cached in its workdir (the reference,
its skill model, the mild child — 128 of 128 residual channels re-ordered, 320 of 384 MLP
neurons, retrained *light* and *gentle* — and the child fine-tuned on the skill directly);
trains nothing. Onto each retrained child it moves ``tau = skill - reference`` in several
ways and scores the skill (``add``) and the child's own tasks (``copy``, ``next``):

* **other scales**: the weight-matched restriction at 0.5, 0.75 and 1.25 tau
  (``benchmarks.cross_size`` has 1.5 and 2);
* **activation matching**: the index maps from
  :func:`.crosssize_activations.match_child_by_activations` instead of the weights';
* **a residual transform fitted on activations**: least-squares or orthogonal Procrustes maps
  between the parent's residual stream (restricted to the matched channels) and the retrained
  child's, on the toy world's calibration text, applied to tau's residual-side axes
  (:func:`.crosssize_activations.transfer_mapped`).
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

from benchmarks import cross_size as xs  # noqa: E402
from benchmarks import docs_pages  # noqa: E402
from benchmarks import paper_analog as pa  # noqa: E402
from benchmarks import toyworld as tw  # noqa: E402
from mergekit_symalign import crosssize as cs  # noqa: E402
from mergekit_symalign import crosssize_activations as csa  # noqa: E402

HIDDEN, INTERMEDIATE = 128, 320  # the mild child of benchmarks.cross_size --child-size 128,320
SUFFIX = f"-{HIDDEN}x{INTERMEDIATE}"
CALIBRATION_LINES = 400
ROW_TOKENS = 64  # the toy models' max_position_embeddings
DIRECT = "child fine-tuned on the skill"
BASELINE = "child + tau, matched (weights)"


def calibration_ids(root: Path, world) -> torch.Tensor:
    """The paper analog's calibration text (raw text and task lines of every task), tokenized
    with the toy tokenizer and packed into rows of :data:`ROW_TOKENS`."""
    from transformers import AutoTokenizer

    from mergekit_symalign.calibration import load_calibration, tokenize_calibration

    path = pa.write_calibration(root / "calibration.txt", world, CALIBRATION_LINES)
    tok = AutoTokenizer.from_pretrained(str(root / "reference"))
    return tokenize_calibration({"reference": tok}, load_calibration(path), ROW_TOKENS)


def run_seed(workdir: Path, seed: int, world, problems, strengths) -> List[Dict]:
    root = workdir / f"seed{seed}"
    reference, skill = xs._load(root / "reference"), xs._load(root / "skill")
    ref_sd, skill_sd, config = reference.state_dict(), skill.state_dict(), reference.config
    ids = calibration_ids(root, world)
    rows = []
    for strength in strengths:
        folder = root / f"child-{strength}{SUFFIX}"
        if not (folder / "build.json").is_file():
            raise SystemExit(f"{folder} is missing: run `python -m benchmarks.cross_size --seeds "
                             f"{seed + 1} --child-size {HIDDEN},{INTERMEDIATE} --strengths "
                             f"{','.join(strengths)}` first (it trains and caches the children)")
        child = xs._load(folder)
        child_sd, child_cfg = child.state_dict(), child.config
        tuned = xs._load(root / f"child-{strength}{SUFFIX}-skill").state_dict()
        weights = cs.match_child(ref_sd, config, child_sd, child_cfg)
        t = time.perf_counter()
        fits = {fit: csa.match_child_by_activations(ref_sd, config, child_sd, child_cfg, ids, residual_fit=fit)
                for fit in csa.RESIDUAL_FITS}
        act_s = (time.perf_counter() - t) / len(fits)
        act = fits["lstsq"]
        variants = {
            "child": child_sd,
            BASELINE: cs.transfer(child_sd, ref_sd, skill_sd, config, weights.map),
            "child + 1.25 tau, matched (weights)": cs.transfer(child_sd, ref_sd, skill_sd, config,
                                                               weights.map, scale=1.25),
            "child + 0.75 tau, matched (weights)": cs.transfer(child_sd, ref_sd, skill_sd, config,
                                                               weights.map, scale=0.75),
            "child + 0.5 tau, matched (weights)": cs.transfer(child_sd, ref_sd, skill_sd, config,
                                                              weights.map, scale=0.5),
            "child + tau, matched (activations)": cs.transfer(child_sd, ref_sd, skill_sd, config, act.map),
            "child + tau, least-squares residual maps": csa.transfer_mapped(child_sd, ref_sd, skill_sd,
                                                                            config, act),
            "child + 0.75 tau, least-squares residual maps": csa.transfer_mapped(
                child_sd, ref_sd, skill_sd, config, act, scale=0.75),
            "child + tau, Procrustes residual maps": csa.transfer_mapped(child_sd, ref_sd, skill_sd, config,
                                                                         fits["procrustes"]),
            DIRECT: tuned,
        }
        # how far the fitted maps are from the index map (identity in the child's order)
        eye = torch.eye(HIDDEN, dtype=torch.float64)
        maps = act.residual_maps
        drift = statistics.mean(float((m - eye).norm() / eye.norm()) for m in
                                maps.writers + [r[s] for r in maps.readers for s in ("attn", "mlp")])
        extra = {"weights_equal_activations": weights.map == act.map,
                 "act_recovery_vs_weights": act.map.recovery(weights.map),
                 "act_worst": act.worst(), "weights_worst": weights.worst(), "act_s": act_s,
                 "map_distance": drift, "tokens": int(ids.numel())}
        for name, state in variants.items():
            row = {"seed": seed, "strength": strength, "variant": name,
                   **xs.score(xs._model(child_cfg, state), problems), **extra}
            rows.append(row)
            print(f"  seed {seed} {strength:>6} | {name:<46} skill {row['skill']:.2f} own {row['own']:.2f}",
                  flush=True)
        print(f"  seed {seed} {strength}: activation map = weight map: {extra['weights_equal_activations']} "
              f"({extra['act_recovery_vs_weights']}); weakest correlation {act.worst():.3f}; "
              f"maps' distance from the identity {drift:.3f}; {act_s:.1f} s per activation match",
              flush=True)
    return rows


def table(rows: List[Dict], strengths) -> str:
    mean_se = pa.mean_se
    out = []
    for strength in strengths:
        sel = [r for r in rows if r["strength"] == strength]
        if not sel:
            continue
        steps, lr = xs.STRENGTHS[strength]
        seeds = sorted({r["seed"] for r in sel})
        out += [f"**Child retrained {steps} steps at lr {lr:g}** ({strength}; {len(seeds)} "
                f"seed{'s' if len(seeds) > 1 else ''}):", "",
                "| model | skill: add | own: copy, next | share of the direct fine-tune's gain |",
                "|---|---:|---:|---:|"]
        by = {(r["seed"], r["variant"]): r for r in sel}
        for variant in dict.fromkeys(r["variant"] for r in sel):
            vs = [by[(s, variant)] for s in seeds]
            shares = []
            for s in seeds:
                gain = by[(s, DIRECT)]["skill"] - by[(s, "child")]["skill"]
                shares.append((by[(s, variant)]["skill"] - by[(s, "child")]["skill"]) / gain
                              if gain > 0 else float("nan"))
            out.append(f"| {variant} | {mean_se([r['skill'] for r in vs])} | "
                       f"{mean_se([r['own'] for r in vs])} | "
                       f"{'' if variant == 'child' else mean_se(shares)} |")
        first = [by[(s, "child")] for s in seeds]
        out += ["", f"Activation-matched index maps equal the weight-matched ones in "
                f"{sum(r['weights_equal_activations'] for r in first)} of {len(first)} seeds; "
                f"weakest matched mean correlation {mean_se([r['act_worst'] for r in first])} "
                f"(weights: weakest cosine {mean_se([r['weights_worst'] for r in first])}); "
                f"the least-squares maps' distance from the index map (relative Frobenius, "
                f"mean over layers and sites) {mean_se([r['map_distance'] for r in first])}; "
                f"{first[0]['tokens']} calibration tokens; "
                f"{mean_se([r['act_s'] for r in first])} s per activation match.", ""]
    return "\n".join(out)


TINY_ARCHS = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "qwen3", "olmo2", "phi3")


def tiny_recovery() -> str:
    """``--tiny``: on the tests' tiny random parents of every architecture pruned on every axis
    (tests/test_crosssize.py's sizes) and not retrained, the share of the true indices each
    path recovers and its weakest matched figure (2048 random tokens)."""
    from tests.conftest import VOCAB, make_config, make_model

    sizes = dict(hidden=36, kv_heads=1, heads_per_group=2, intermediate=56, drop_layers=(2,))
    ids = torch.randint(0, VOCAB, (32, 64), generator=torch.Generator().manual_seed(3))
    out = ["| architecture | weights: indices recovered (weakest cosine) | activations, own streams only | activations (default: own streams + the parent on the child's inputs) |",
           "|---|---:|---:|---:|"]
    default = csa.SAME_INPUT_WEIGHT

    def cell(match, truth):
        rec = match.map.recovery(truth)
        return (f"{rec['residual']:.2f} / {rec['kv_groups']:.2f} / {rec['q_heads']:.2f} / "
                f"{rec['neurons']:.2f} ({match.worst():.2f})")
    try:
        for arch in TINY_ARCHS:
            config = make_config(arch, num_hidden_layers=4)
            parent = make_model(arch, seed=0, num_hidden_layers=4).state_dict()
            child, child_cfg, truth = cs.prune_state_dict(parent, config, **sizes)
            weights = cs.match_child(parent, config, child, child_cfg)
            cells = []
            for weight in (0.0, default):
                csa.SAME_INPUT_WEIGHT = weight
                cells.append(cell(csa.match_child_by_activations(parent, config, child, child_cfg, ids), truth))
            out.append(f"| {arch} | {'all' if weights.map == truth else 'not all'} ({weights.worst():.2f}) | "
                       f"{cells[0]} | {cells[1]} |")
            print(out[-1], flush=True)
    finally:
        csa.SAME_INPUT_WEIGHT = default
    return "\n".join(out)


def smollm2_recovery() -> str:
    """``--smollm2``: SmolLM2-135M-Instruct pruned as in tests/test_crosssize.py (576 -> 432
    channels, 3 -> 2 KV groups, 1536 -> 1152 neurons, layers 9, 20, 21 dropped), not retrained,
    matched on activations over the shipped calibration set (the merge's default budget)."""
    from examples import smollm
    from mergekit_symalign.calibration import default_token_budget, load_calibration, tokenize_calibration

    model, tok = smollm.load_smollm2(torch.float32)
    parent = {k: v.clone() for k, v in model.state_dict().items()}
    child, child_cfg, truth = cs.prune_state_dict(parent, model.config, hidden=432, kv_heads=2,
                                                  intermediate=1152, drop_layers=(9, 20, 21))
    ids = tokenize_calibration({"smollm2": tok}, load_calibration(), 128,
                               budget=default_token_budget(model.config.intermediate_size))
    default = csa.SAME_INPUT_WEIGHT
    out = ["| evidence | residual / KV groups / query heads / neurons recovered | neurons wrong | weakest correlation | s |",
           "|---|---:|---:|---:|---:|"]
    try:
        for weight, name in ((0.0, "own streams only"), (default, "own streams + the parent on the child's inputs (default)")):
            csa.SAME_INPUT_WEIGHT = weight
            t = time.perf_counter()
            match = csa.match_child_by_activations(parent, model.config, child, child_cfg, ids)
            seconds = time.perf_counter() - t
            rec = match.map.recovery(truth)
            wrong = sum(int((a.neurons != b.neurons).sum()) for a, b in zip(match.map.per_layer, truth.per_layer))
            out.append(f"| {name} | {rec['residual']:.3f} / {rec['kv_groups']:.3f} / {rec['q_heads']:.3f} / "
                       f"{rec['neurons']:.4f} | {wrong} of {1152 * 27} | {match.worst():.2f} | {seconds:.0f} |")
            print(out[-1], flush=True)
    finally:
        csa.SAME_INPUT_WEIGHT = default
    return (f"SmolLM2-135M-Instruct pruned to 432 channels, 2 KV groups, 1152 neurons, 27 layers, not "
            f"retrained; {ids.numel()} calibration tokens of the shipped set. Regenerate: "
            f"`.venv/bin/python -m benchmarks.cross_size_drift --smollm2` (2-core x86_64 CPU shared "
            f"with other jobs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}).\n\n" + "\n".join(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workdir", default="bench-output/cross-size",
                    help="benchmarks.cross_size's workdir (its cached models are reused)")
    ap.add_argument("--problems", type=int, default=100, help="held-out problems per task")
    ap.add_argument("--strengths", default="light,gentle")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="only the index recovery on tiny random models of every architecture")
    ap.add_argument("--smollm2", action="store_true",
                    help="only the index recovery on SmolLM2-135M-Instruct pruned, not retrained")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.smollm2:
        text = smollm2_recovery()
        if not args.no_docs:
            docs_pages.update_page("cross-size.md", "cross_size_smollm2_activations", text)
        return 0
    if args.tiny:
        text = (f"Tiny random parents (hidden 48, 4 layers) pruned to 36 channels, 1 of 2 KV groups, "
                f"2 of 3 query heads, 56 of 80 neurons, layer 2 dropped; not retrained; 2048 random "
                f"tokens. Activation columns: the share of the true indices recovered, residual / KV groups / "
                f"query heads / neurons (weakest matched mean correlation). Regenerate: "
                f"`.venv/bin/python -m benchmarks.cross_size_drift --tiny` "
                f"(2-core x86_64 CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}).\n\n"
                + tiny_recovery())
        if not args.no_docs:
            docs_pages.update_page("cross-size.md", "cross_size_tiny_activations", text)
        return 0
    strengths = args.strengths.split(",")
    workdir = Path(args.workdir).resolve()
    world = tw.World()
    held = {t: tw.held_out(t, 200) for t in tw.TASKS}  # the same held-out sets as cross_size
    problems = {t: exs[: args.problems] for t, exs in held.items()}
    start = time.perf_counter()
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(workdir, seed, world, problems, strengths)
    wall = time.perf_counter() - start
    (workdir / f"drift{SUFFIX}.json").write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=1, default=str))
    header = (f"{args.seeds} seeds, mean ± standard error; {args.problems} held-out problems per task "
              f"(greedy, exact match). Parent: the paper analog's reference; child: all {HIDDEN} "
              f"residual channels (re-ordered) and {INTERMEDIATE} of 384 neurons per layer kept by "
              f"importance, retrained on the reference's data; the models of "
              f"`benchmarks.cross_size --child-size {HIDDEN},{INTERMEDIATE}`. Share of the gain: "
              f"(variant − child) / (direct fine-tune − child) on the skill, per seed. "
              f"Regenerate: `.venv/bin/python -m benchmarks.cross_size_drift --seeds {args.seeds} "
              f"--strengths {','.join(strengths)}` ({wall / 60:.0f} min on a shared 2-core x86_64 "
              f"CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; the models trained "
              f"beforehand).")
    text = header + "\n\n" + table(rows, strengths)
    print(text)
    if not args.no_docs:
        docs_pages.update_page("cross-size.md", "cross_size_drift", text)
        print("wrote docs/cross-size.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
