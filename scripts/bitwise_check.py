"""Before/after check for refactors: merge the test family's recipes through mergekit and
compare every output tensor bit for bit with digests recorded from earlier code.

    .venv/bin/python scripts/bitwise_check.py --record digests.json   # on the old code
    .venv/bin/python scripts/bitwise_check.py --compare digests.json  # on the new code

The models are the tests' tiny random Llama family (tests/conftest.py), built afresh with fixed
seeds; the recipes cover each input path of the planner: weights (both output frames, float32
and bfloat16, one and two skills), activations, residual permutation / orthogonal (the norm
refold), TIES / breadcrumbs, a plain fusion onto the reference, a tokenizer section (mergekit's
vocabulary path), the alignment cache (solved, then read back), tied embeddings (Gemma).
Digests depend on the machine's floating-point kernels: compare runs on one machine only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

TA, TIES, CRUMBS = ("symmetry_aligned_" + m for m in ("task_arithmetic", "ties", "breadcrumbs"))


def build_family(root: Path) -> dict:
    from tests.support import perturbed
    from mergekit_symalign.spec import Switches
    from mergekit_symalign.statedict import scramble_state_dict
    from tests.conftest import make_config, make_model, save, save_word_tokenizer, word_calibration

    config = make_config("llama")
    ref = make_model("llama", seed=0)
    sd = ref.state_dict()
    skill, sibling = perturbed(ref, seed=1, scale=0.05), perturbed(ref, seed=2, scale=0.02)
    fam = {"reference": save(ref, config, root / "reference"),
           "skill": save(skill, config, root / "skill"),
           "sibling": save(sibling, config, root / "sibling"),
           "skill2": save(perturbed(ref, seed=3, scale=0.04), config, root / "skill2")}
    fam["reference_scrambled"] = save(scramble_state_dict(sd, config, seed=11)[0], config,
                                      root / "reference_scrambled")
    fam["skill_scrambled"] = save(scramble_state_dict(skill, config, seed=12)[0], config,
                                  root / "skill_scrambled")
    fam["sibling_scrambled"] = save(
        scramble_state_dict(sibling, config, seed=13, switches=Switches(scaling=False))[0],
        config, root / "sibling_scrambled")
    for mode, seed in (("permutation", 21), ("orthogonal", 22)):
        fam[mode] = save(scramble_state_dict(sd, config, seed=seed, residual=mode)[0], config,
                         root / mode)
    for name in list(fam):
        save_word_tokenizer(Path(fam[name]))
    fam["calibration"] = word_calibration(root / "calibration.txt")
    gconfig = make_config("gemma3_text")
    gref = make_model("gemma3_text", seed=0)
    gskill = perturbed(gref, seed=1, scale=0.05)
    fam["g_reference"] = save(gref, gconfig, root / "g_reference")
    fam["g_skill"] = save(gskill, gconfig, root / "g_skill")
    fam["g_base"] = save(scramble_state_dict(perturbed(gref, seed=2, scale=0.02), gconfig, seed=14,
                                             residual="permutation")[0], gconfig, root / "g_base")
    return fam


def recipes(fam: dict, root: Path) -> dict:
    from tests.support import aligned_recipe as rec

    cache = str(root / "cache")
    calib = dict(alignment="activations", calibration=fam["calibration"], calibration_samples=64,
                 calibration_max_tokens=32)
    return {
        "weights_base": rec(TA, fam["sibling_scrambled"], fam["reference"], [fam["skill_scrambled"]]),
        "weights_reference_frame": rec(TA, fam["sibling_scrambled"], fam["reference"],
                                       [fam["skill_scrambled"]], output_frame="reference"),
        "weights_bf16": rec(TA, fam["sibling_scrambled"], fam["reference"], [fam["skill_scrambled"]],
                            dtype="bfloat16"),
        "weights_two_skills_lambda": {
            **rec(TA, fam["sibling_scrambled"], fam["reference"],
                  [fam["skill_scrambled"], (fam["skill2"], {"weight": 0.5})]),
            "parameters": {"lambda": 0.7, "normalize": True}},
        "weights_unaligned_skill": rec(TA, fam["reference_scrambled"], fam["reference"],
                                       [(fam["skill"], {"align": False})]),
        "ties_two_skills": {**rec(TIES, fam["sibling_scrambled"], fam["reference"],
                                  [(fam["skill_scrambled"], {"density": 0.6}),
                                   (fam["skill2"], {"density": 0.4, "weight": 0.8})])},
        "breadcrumbs_no_transfer": rec(CRUMBS, fam["reference"], fam["reference"],
                                       [(fam["skill_scrambled"], {"density": 0.8}), fam["sibling"]]),
        "activations_ties": rec(TIES, fam["reference_scrambled"], fam["reference"],
                                [fam["skill_scrambled"]], **calib),
        "activations_residual_reference_frame": rec(TA, fam["permutation"], fam["reference"],
                                                    [fam["skill"]], residual="permutation",
                                                    output_frame="reference", **calib),
        "residual_permutation": rec(TA, fam["permutation"], fam["reference"], [fam["skill"]],
                                    residual="permutation"),
        "residual_orthogonal_base": rec(TA, fam["orthogonal"], fam["reference"], [fam["skill"]],
                                        residual="orthogonal"),
        "residual_orthogonal_reference": rec(TA, fam["orthogonal"], fam["reference"], [fam["skill"]],
                                             residual="orthogonal", output_frame="reference"),
        "residual_orthogonal_rotated_pair": rec(TIES, fam["reference"], fam["orthogonal"],
                                                [(fam["skill_scrambled"], {"density": 0.7})],
                                                residual="orthogonal"),
        "tokenizer_section": {**rec(TA, fam["sibling_scrambled"], fam["reference"],
                                    [fam["skill_scrambled"]]),
                              "tokenizer": {"source": "base"}},
        "cache_solve": rec(TA, fam["sibling_scrambled"], fam["reference"], [fam["skill_scrambled"]],
                           residual="permutation", alignment_cache=cache),
        "cache_reuse": rec(TA, fam["sibling_scrambled"], fam["reference"], [fam["skill_scrambled"]],
                           residual="permutation", alignment_cache=cache),
        "gemma_tied_residual": rec(TA, fam["g_base"], fam["g_reference"], [fam["g_skill"]],
                                   residual="permutation"),
    }


def digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
    return f"{tensor.dtype}{tuple(tensor.shape)}:" + hashlib.sha256(data).hexdigest()[:24]


def state_dict_alignments(fam: dict, root: Path) -> dict:
    """statedict.align_state_dict (the solve outside mergekit) on the same models: the aligned
    tensors, per residual mode, and solved then read back through a cache."""
    from tests.support import load_tensors
    from mergekit_symalign.statedict import align_state_dict
    from tests.conftest import make_config

    config = make_config("llama")
    reference = load_tensors(fam["reference"])
    out = {}
    for name, model, kwargs in (
            ("statedict_weights", "skill_scrambled", {}),
            ("statedict_permutation", "permutation", {"residual": "permutation"}),
            ("statedict_orthogonal", "orthogonal", {"residual": "orthogonal"}),
            ("statedict_cache_solve", "permutation", {"residual": "permutation", "cache": str(root / "sd")}),
            ("statedict_cache_reuse", "permutation", {"residual": "permutation", "cache": str(root / "sd")})):
        out[name] = align_state_dict(reference, load_tensors(fam[model]), config, **kwargs)[0]
    return out


def run_all(only=None) -> dict:
    from tests.support import load_tensors, run_recipe

    root = Path(tempfile.mkdtemp(prefix="bitwise_"))
    try:
        fam = build_family(root)
        out = {}
        for name, recipe in recipes(fam, root).items():
            if only and name not in only:
                continue
            t = time.perf_counter()
            folder = run_recipe(recipe, root / "out" / name)
            tensors = load_tensors(folder)
            out[name] = {k: digest(v) for k, v in sorted(tensors.items())}
            print(f"{name}: {len(tensors)} tensors, {time.perf_counter() - t:.1f} s", flush=True)
        for name, tensors in state_dict_alignments(fam, root).items():
            if not only or name in only:
                out[name] = {k: digest(v) for k, v in sorted(tensors.items())}
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", metavar="JSON")
    group.add_argument("--compare", metavar="JSON")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    args = parser.parse_args(argv)
    got = run_all(args.only)
    if args.record:
        Path(args.record).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"recorded {sum(map(len, got.values()))} tensor digests of {len(got)} merges")
        return 0
    want = json.loads(Path(args.compare).read_text())
    bad = [(r, k) for r in got for k in set(got[r]) | set(want.get(r, {}))
           if got[r].get(k) != want.get(r, {}).get(k)]
    for r, k in bad:
        print(f"DIFFERENT {r} {k}: {want.get(r, {}).get(k)} -> {got[r].get(k)}")
    total = sum(map(len, got.values()))
    print(f"{total - len(bad)}/{total} tensors of {len(got)} merges bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
