"""Which of mergekit 0.1.5's architecture definitions the plugin aligns, and why it refuses
the rest: the table of ``docs/architectures.md``, generated from the code so it cannot drift.

``python -m mergekit_symalign.coverage`` prints the page; ``--write`` writes it (a test
requires the committed page to equal the generated one).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .architectures import ARCHITECTURES, NOT_DECODERS, REFUSALS
from .errors import UnsupportedArchitecture

PAGE = Path(__file__).resolve().parent.parent / "docs" / "architectures.md"
# The test that proves each aligned row (a random group element applied, undone, logits equal).
SCRAMBLE_TEST = "tests/test_architectures_table.py::test_scramble_keeps_logits_and_alignment_undoes_it"
EXPERT_TEST = "tests/test_moe.py"
CLASSIFIER_RESIDUAL = ("the layers are aligned; residual: is refused (the task head reads the "
                       "residual stream and is not moved)")


MOE_NOTES = """## Mixtures of experts

*The symmetries.* Top-k routing is equivariant: permuting the experts together with their
router rows (and any per-expert router vector) selects the same experts under new numbers.
Inside each expert, the SwiGLU neurons permute and the up branch scales as in a dense MLP; a
shared expert (Qwen2-MoE) is a dense MLP and its gate a reader of the residual stream, as is
the router; attention and heads are the dense model's. Experts are matched as wholes on the
Gram matrices of their gate rows (unchanged by any permutation of their neurons) and of their
router rows, before each expert's neurons are matched inside it. On descendants of one base
the expert permutation is the identity and a merge on the reference is mergekit's own
`task_arithmetic`, bit for bit (`tests/test_moe.py`).

*Checkpoint layouts.* mergekit 0.1.5's `mixtral` and `qwen3_moe` definitions name the fused
tensors of transformers 5 (`mlp.experts.gate_up_proj` `[experts, 2 I, D]`,
`mlp.experts.down_proj`, the router `mlp.gate.weight`); reading a Hub checkpoint's per-expert
tensors (`block_sparse_moe.experts.N.w1`, `mlp.experts.N.gate_proj`) it converts them as it
loads, and it writes the fused layout whatever it read. The plugin aligns what mergekit reads,
so both layouts merge, and the output is fused (tested in both layouts through
`mergekit-yaml`). `alignment: activations` is refused for experts (the activation path has no
mirror of the expert symmetries); `residual:` works.

*What alignment cannot tell apart.* Experts that are exact copies of each other (an upcycled
MoE at initialisation) cannot be told apart by their weights: with distinct router rows the
router rows tell them apart, and with the router rows tied too every matching of the copies
gives the same model; either way the answer is deterministic (the same on every run) and
exact. Exactness itself ends at ties between router logits of *different* experts:
`torch.topk` breaks a tie by expert number, so after a permutation a token whose top-k is
tied may reach another expert (`tests/test_moe.py` shows such a model changing its logits).
Ties need exactly equal logits: rare in float32, less so in bfloat16 (8 bits of mantissa),
where a moved checkpoint may send a tied token to another expert of the same score.

*Cost.* `python -m benchmarks.bench_moe` writes `docs/moe-benchmark.md`: one Mixtral-8x7B-shaped
layer, aligned vs plain in the same run.
"""


@dataclass(frozen=True)
class Row:
    classes: Tuple[str, ...]  # mergekit's architecture names with this model type
    model_type: str
    status: str  # "aligned" or "refused"
    reason: str
    test: str


def mergekit_definitions() -> List[Tuple[str, str]]:
    """(architecture class, model type) of every definition mergekit ships: its JSON files and
    the MoE definitions it builds in Python (AfMoE, GLM-4.5)."""
    from mergekit.architecture.json_definitions import NAME_TO_ARCH
    from mergekit.architecture.moe_defs import AfmoeModuleArchitecture, Glm4MoeModuleArchitecture

    pairs = {(name, arch.expected_model_type) for name, archs in NAME_TO_ARCH.items() for arch in archs}
    pairs |= {(AfmoeModuleArchitecture.ARCHITECTURE_NAME, "afmoe"),
              (Glm4MoeModuleArchitecture.ARCHITECTURE_NAME, "glm4_moe")}
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def _supported(model_type: str) -> Optional[str]:
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch.name
    return None


def rows() -> List[Row]:
    by_type = {}
    for cls, model_type in mergekit_definitions():
        if model_type in NOT_DECODERS:
            continue
        by_type.setdefault(model_type, []).append(cls)
    out = []
    for model_type, classes in sorted(by_type.items()):
        spec = _supported(model_type)
        if spec is not None:
            arch = ARCHITECTURES[spec]
            heads = [c for c in classes if not c.endswith(("ForCausalLM", "LMHeadModel",
                                                            "ForConditionalGeneration"))]
            reason = f"spec `{spec}`"
            if arch.experts is not None:
                reason += ("; experts permuted with their router rows, each expert's SwiGLU "
                           "neurons and scales, both checkpoint layouts")
            if heads:
                reason += f"; {', '.join(heads)}: {CLASSIFIER_RESIDUAL}"
            test = f"`{SCRAMBLE_TEST}[{model_type}]`"
            if arch.experts is not None:
                test += f", `{EXPERT_TEST}`"
            out.append(Row(tuple(classes), model_type, "aligned", reason, test))
        elif model_type in REFUSALS:
            out.append(Row(tuple(classes), model_type, "refused", REFUSALS[model_type],
                           f"`{SCRAMBLE_TEST.rsplit('::', 1)[0]}::test_refused_with_its_reason[{model_type}]`"))
        else:
            raise UnsupportedArchitecture(
                f"mergekit defines {model_type!r} ({', '.join(classes)}) but it is neither aligned "
                f"nor listed in architectures.REFUSALS: add one or the other")
    return out


def markdown() -> str:
    table = rows()
    aligned = sum(r.status == "aligned" for r in table)
    lines = [
        "# Architectures",
        "",
        "<!-- generated by `python -m mergekit_symalign.coverage --write`; do not edit by hand -->",
        "",
        f"Every decoder architecture that mergekit 0.1.5 ships a definition for ({len(table)} "
        f"model types; {aligned} aligned, {len(table) - aligned} refused). *Aligned*: the "
        f"plugin has a symmetry spec, proven by the scramble test named in the row (a random "
        f"element of the whole group applied to a tiny model keeps its logits, and the "
        f"alignment undoes it). *Refused*: `symmetry_aligned_*` methods stop before writing "
        f"anything, with the reason below; mergekit's plain methods merge these models as "
        f"usual.",
        "",
        "| model type | mergekit architectures | status | why | test |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| `{r.model_type}` | {', '.join(r.classes)} | {r.status} | {r.reason} | {r.test} |")
    lines += [
        "",
        f"Not decoders (mergekit defines them; the plugin refuses them as having no spec): "
        f"{', '.join(f'`{t}`' for t in NOT_DECODERS)}.",
        "",
        "`qwen2_moe` (Qwen2-MoE's shared expert and its gate) has a spec too, proven on state "
        "dicts (`tests/test_moe.py`), but mergekit 0.1.5 has no definition for it, so "
        "`mergekit-yaml` cannot merge it.",
        "",
        MOE_NOTES,
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {PAGE}")
    args = parser.parse_args(argv)
    page = markdown()
    if args.write:
        PAGE.write_text(page)
    else:
        print(page, end="")


if __name__ == "__main__":
    main()
