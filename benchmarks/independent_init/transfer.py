"""Transfer: ``tau = skill - reference`` (init A) put into a target of init B, through
mergekit (plain and aligned recipes) and, for iterative weight matching, on state dicts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch

from benchmarks import paper_analog as pa
from benchmarks import toyworld as tw
from benchmarks.independent_init.matching import ROUNDS, weight_matching
from benchmarks.independent_init.states import StateDict, load_state, relative_distance, save_state
from benchmarks.independent_init.variants import SAME_BASE
from examples.common import mean_kl
from tests.support import run_recipe


def transfer_seed(root: Path, paths: Dict[str, Path], config, problems, calibration: Path,
                  variants: Mapping[str, Tuple[str, Any]], seed: int) -> List[Dict]:
    from transformers import LlamaForCausalLM

    def logp(name, tasks):
        model = LlamaForCausalLM.from_pretrained(str(paths[name]), dtype=torch.float32).eval()
        return tw.completion_logprobs(model, [ex for t in tasks for ex in problems[t]])

    reference, skill = load_state(paths["reference"]), load_state(paths["skill"])
    tau_norm = relative_distance(reference, skill)
    skill_logp = logp("skill", ["add"])
    rows = [{"seed": seed, "setting": "models", "variant": n,
             **pa.score(paths[n], problems, skill_logp, None)} for n in ("reference", "skill")]
    settings = {"same base": "target", "other init": "target-other-init"}
    for setting, target in settings.items():
        target_logp = logp(target, pa.OWN_TASKS)
        target_sd = load_state(paths[target])
        rows.append({"seed": seed, "setting": setting, "variant": "target",
                     "distance_to_reference": relative_distance(reference, target_sd),
                     "tau": tau_norm, **pa.score(paths[target], problems, skill_logp, target_logp)})
        for variant, (folder, params) in variants.items():
            if setting == "same base" and variant not in SAME_BASE:
                continue
            out = root / "merges" / f"{target}--{folder}"
            t = time.perf_counter()
            extra: Dict[str, float] = {}
            if params == "iterative":
                trace: List[Dict] = []
                aligned, _ = weight_matching(reference, target_sd, config, "orthogonal",
                                             rounds=ROUNDS, trace=trace)
                merged = {k: aligned[k] + skill[k] - reference[k] for k in aligned}
                save_state(merged, config, out)
                extra["distance_to_reference"] = trace[-1]["distance"]
            else:
                run_recipe(pa.recipe(params, paths[target], paths["reference"], paths["skill"],
                                     calibration), out, lazy_unpickle=False)
                if params is not None:  # how far the aligned target is from the reference
                    how = ("activations" if params.get("alignment") == "activations"
                           else "weights")
                    if how == "weights":
                        aligned, _ = weight_matching(reference, target_sd, config,
                                                     params.get("residual", "none"))
                        extra["distance_to_reference"] = relative_distance(reference, aligned)
                        # the merge through mergekit computes what the state-dict formula
                        # computes (its output frame differs; its function must not)
                        check = {k: aligned[k] + skill[k] - reference[k] for k in aligned}
                        extra["statedict_check_kl"] = check_same_function(out, check, config,
                                                                          problems)
            wall = time.perf_counter() - t
            row = {"seed": seed, "setting": setting, "variant": variant, "merge_s": wall,
                   **extra, **pa.score(Path(out), problems, skill_logp, target_logp)}
            rows.append(row)
            print(f"  seed {seed} {setting:>10} | {variant:<44} skill {row['skill']:.2f} "
                  f"own {row['own']:.2f} shared {row['shared']:.2f} KL(skill) "
                  f"{row['kl_skill']:.3f} KL(target) {row['kl_target']:.3f}", flush=True)
    return rows


@torch.no_grad()
def check_same_function(folder: Path, state: StateDict, config, problems) -> float:
    """KL between the merged checkpoint and ``state`` (same formula, maybe another frame)."""
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    mine = LlamaForCausalLM(config).eval()
    mine.load_state_dict(state)
    examples = [ex for t in tw.TASKS for ex in problems[t][:20]]
    return mean_kl(tw.completion_logprobs(merged, examples), tw.completion_logprobs(mine, examples))
