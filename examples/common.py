"""What the demo, the benchmarks and the tests share: transfer recipes, the two ways they run a
merge (in this process, or through an unmodified ``mergekit-yaml``), and small tensor helpers.

Paths in recipes are written as given: mergekit treats a relative ``a/b`` as a Hub id in places
(its model card), so callers that care pass absolute paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

ALIGNED_TASK_ARITHMETIC = "symmetry_aligned_task_arithmetic"

PathLike = Union[str, os.PathLike]
Recipe = Dict[str, Any]
Skill = Union[PathLike, Tuple[PathLike, Dict[str, Any]]]  # a path, or (path, its parameters)


# --------------------------------------------------------------------------- recipes


def aligned_recipe(method: str, base: PathLike, reference: PathLike, skills: Iterable[Skill],
                   dtype: str = "float32", **parameters) -> Recipe:
    """``method`` (a ``symmetry_aligned_*`` one) putting the skill vectors ``skill - reference``
    into ``base``: ``aligned(base) + combine({aligned(skill_i) - reference})``.

    Each skill is a path or ``(path, parameters)``; its weight is 1.0 unless those parameters
    say otherwise. ``parameters`` are the method's global ones (left out of the recipe when
    there are none).
    """
    models = [{"model": str(reference), "parameters": {"role": "reference"}}]
    for skill in skills:
        path, params = skill if isinstance(skill, tuple) else (skill, {})
        models.append({"model": str(path), "parameters": {"weight": 1.0, **params}})
    recipe: Recipe = {"merge_method": method, "base_model": str(base), "models": models,
                      "dtype": dtype}
    if parameters:
        recipe["parameters"] = dict(parameters)
    return recipe


def plain_transfer_recipe(target: PathLike, reference: PathLike, skill: PathLike,
                          dtype: str = "float32") -> Recipe:
    """mergekit's own ``task_arithmetic`` for ``target + (skill - reference)``, written as
    ``reference + (skill - reference) + (target - reference)`` (the target's term is left out
    when the target is the reference)."""
    models = [{"model": str(skill), "parameters": {"weight": 1.0}}]
    if str(target) != str(reference):
        models.append({"model": str(target), "parameters": {"weight": 1.0}})
    return {"merge_method": "task_arithmetic", "base_model": str(reference), "models": models,
            "dtype": dtype}


def transfer_recipe(target: PathLike, reference: PathLike, skill: PathLike,
                    parameters: Optional[Dict[str, Any]] = None, dtype: str = "float32") -> Recipe:
    """One skill vector onto ``target``: plain task arithmetic when ``parameters`` is None,
    otherwise ``symmetry_aligned_task_arithmetic`` with these global parameters."""
    if parameters is None:
        return plain_transfer_recipe(target, reference, skill, dtype)
    return aligned_recipe(ALIGNED_TASK_ARITHMETIC, target, reference, [skill], dtype=dtype,
                          **parameters)


# --------------------------------------------------------------------------- merges


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


def write_recipe(recipe: Recipe, path: PathLike) -> str:
    """``recipe`` as a YAML file at ``path`` (folders created); returns the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def mergekit_yaml_command() -> List[str]:
    """The ``mergekit-yaml`` installed beside this interpreter (or its module, if no script)."""
    script = Path(sys.executable).with_name("mergekit-yaml")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "mergekit.scripts.run_yaml"]


class YamlMerge(NamedTuple):
    wall_s: float  # the merge process's wall time, start-up included
    stderr: str  # its standard error ("" when its output was shown, not captured)


def run_mergekit_yaml(recipe: Recipe, recipe_path: PathLike, out: PathLike, *args: str,
                      quiet: bool = True, show_output: bool = False,
                      command: Optional[Sequence[str]] = None,
                      timeout: Optional[float] = None) -> YamlMerge:
    """Write ``recipe`` to ``recipe_path`` (YAML) and merge it into ``out`` (replaced if it
    exists) with an unmodified ``mergekit-yaml`` in a fresh process, offline.

    ``args``: more ``mergekit-yaml`` options; ``quiet`` passes ``--quiet``; ``show_output``
    lets the merge print instead of capturing its output; ``command`` runs something else
    with ``mergekit-yaml``'s arguments (e.g. a wrapper that measures it). Raises
    ``RuntimeError`` with the end of the merge's output when it fails.
    """
    write_recipe(recipe, recipe_path)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    cmd = list(command or mergekit_yaml_command()) + [str(recipe_path), str(out)]
    cmd += (["--quiet"] if quiet else []) + list(args)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=not show_output, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = "" if show_output else (proc.stdout or "")[-2000:] + (proc.stderr or "")[-4000:]
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}) on {recipe_path}:\n{tail}")
    return YamlMerge(wall, proc.stderr or "")


# --------------------------------------------------------------------------- tensors


def load_tensors(folder: PathLike) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (all its shards)."""
    from safetensors.torch import load_file

    tensors: Dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


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


def pack_examples(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int):
    """Right-padded ``(input_ids, attention_mask, labels)`` of ``(prompt, completion)`` token
    lists; labels only on the completions."""
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return ids, mask, labels


# --------------------------------------------------------------------------- logits


@torch.no_grad()
def logits(path: PathLike, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the float32 model saved in ``path`` on ``ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model(ids).logits


@torch.no_grad()
def text_logits(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """``[tokens, vocab]``: the model's logits at every (non-padding) token of ``texts``."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return model(**enc).logits[enc["attention_mask"].bool()]


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(p || q), both given as log-probabilities."""
    return max(0.0, float((p_log.exp() * (p_log - q_log)).sum(-1).mean()))  # no -0.0000
