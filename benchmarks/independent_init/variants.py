"""What the experiment compares: the models trained per seed, the fusion variants (how base
B is aligned to base A) and the transfer rows."""

from __future__ import annotations

from benchmarks import toyworld as tw
from benchmarks.independent_init.matching import ROUNDS


BASES = ("base", "base-other-init")
TRANSFER_MODELS = ("base", "reference", "skill", "target", "base-other-init", "target-other-init")
# name -> how B is aligned to A (None: plain). "weights": this file's weight matching (with
# rounds=0 and heads it is exactly the package's align_state_dict); "activations": the
# package's align_by_activations on the calibration tokens.
FUSION = {
    "plain": None,
    "layers, no heads": {"how": "weights", "residual": "none", "heads": False},
    "layers + heads": {"how": "weights", "residual": "none"},
    "+ residual permutation": {"how": "weights", "residual": "permutation"},
    "+ residual orthogonal": {"how": "weights", "residual": "orthogonal"},
    "iterative, permutation": {"how": "weights", "residual": "permutation", "rounds": ROUNDS},
    "iterative, orthogonal": {"how": "weights", "residual": "orthogonal", "rounds": ROUNDS},
    "act: layers + heads": {"how": "activations", "residual": "none"},
    "act: + residual permutation": {"how": "activations", "residual": "permutation"},
    "act: + residual orthogonal": {"how": "activations", "residual": "orthogonal"},
}
# Transfer rows: name -> (folder, mergekit parameters (None: plain task arithmetic), or
# "iterative" for the state-dict transfer after iterative weight matching).
TRANSFER = {
    "target + τ (plain task arithmetic)": ("plain", None),
    "target(w.align) + τ": ("weights", {}),
    "target(w.align, residual permutation) + τ": ("weights-rperm", {"residual": "permutation"}),
    "target(w.align, residual orthogonal) + τ": ("weights-rorth", {"residual": "orthogonal"}),
    "target(iterative w.align, orthogonal) + τ": ("iterative-rorth", "iterative"),
    "target(act.align, residual permutation) + τ": (
        "act-rperm", {"alignment": "activations", "residual": "permutation"}),
    "target(act.align, residual orthogonal) + τ": (
        "act-rorth", {"alignment": "activations", "residual": "orthogonal"}),
}
SAME_BASE = ("target + τ (plain task arithmetic)", "target(w.align) + τ",
             "target(w.align, residual orthogonal) + τ")
PARTS_VARIANTS = ("plain", "iterative, orthogonal", "act: layers + heads",
                  "act: + residual orthogonal")


def config_for(width: int):
    return tw.model_config(hidden=width, intermediate=3 * width)
