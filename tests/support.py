"""What the tests (and the benchmarks, which reuse them) need beyond pytest fixtures: merges run
in this process, fine-tuned-looking relatives of a model, and a saved model's logits.

The recipes and the ``mergekit-yaml`` runner are the demo's own (``examples/common.py``),
re-exported here so that the tests merge exactly the recipes the demo writes and import their
helpers from one place.
"""

from __future__ import annotations

from typing import Dict

import torch

from examples.common import (  # noqa: F401  (re-exported for the tests)
    ALIGNED_TASK_ARITHMETIC,
    PathLike,
    Recipe,
    aligned_recipe,
    load_tensors,
    plain_transfer_recipe,
    run_mergekit_yaml,
    transfer_recipe,
    write_recipe,
)


def run_recipe(recipe: Recipe, out: PathLike, **options) -> str:
    """Merge ``recipe`` into ``out`` in this process (mergekit's ``run_merge``); returns ``out``.

    ``options`` go to ``MergeOptions``; unless overridden: no tokenizer copy, no model card,
    no progress output.
    """
    import mergekit_symalign  # noqa: F401  (registers the symmetry_aligned_* methods)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = {"copy_tokenizer": False, "write_model_card": False, "quiet": True, **options}
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=MergeOptions(**options))
    return str(out)


def perturbed(model, seed: int, scale: float = 0.02) -> Dict[str, torch.Tensor]:
    """A fine-tuned-looking relative of a model (or state dict): every weight moved by
    ``scale`` times its own standard deviation of Gaussian noise."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        noise = torch.randn(t.shape, generator=g, dtype=t.dtype)
        out[name] = t + scale * (t.std() if t.numel() > 1 else 1.0) * noise
    return out


@torch.no_grad()
def logits(path: PathLike, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the float32 model saved in ``path`` on ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model(ids).logits
