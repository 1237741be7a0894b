"""The demo's helpers (the benchmarks built on its model family use them too): transfer
recipes, a merge through an unmodified ``mergekit-yaml`` in its own process, and reading
checkpoints, batches and logits. What only the tests need lives in ``tests/support.py``.

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
def text_logits(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """``[tokens, vocab]``: the model's logits at every (non-padding) token of ``texts``."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return model(**enc).logits[enc["attention_mask"].bool()]


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(p || q), both given as log-probabilities."""
    return max(0.0, float((p_log.exp() * (p_log - q_log)).sum(-1).mean()))  # no -0.0000
