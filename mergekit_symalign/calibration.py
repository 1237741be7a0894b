"""Calibration text for activation-based alignment: load, tokenize, check the token budget.

Pure Python + torch; tokenizers are any objects with the Hugging Face tokenizer call API
(``tok(texts, add_special_tokens=True)["input_ids"]`` and ``tok.get_vocab()``).

The default set (``data/calibration.jsonl``, about 89k tokens with SmolLM2's tokenizer) mixes
a few hundred short, varied prompts written for this project (instructions, math word
problems, arithmetic, code, prose, questions, lists and dialogue) with documentation strings
of Python's standard library (PSF License, ``data/PSF-LICENSE.txt``); it is built by
``scripts/make_calibration.py`` and read offline. Unless ``calibration_samples`` is set, a
merge uses as much of it as :func:`default_token_budget` asks for the model's width (twice
``intermediate_size``: ~29k tokens for an 8B Llama, ~57k for a 70B one, 4k for SmolLM2-135M).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.jsonl"
DEFAULT_MIN_TOKENS = 4096
UNKNOWN_LIMIT = 0.5  # refuse calibration text that is mostly the tokenizer's unknown token
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl",)

_REMEDY = (
    "Pass a UTF-8 .txt file with one prompt per line, or a .jsonl file with one JSON object "
    'per line carrying a "text" (or "prompt") field; or leave the calibration file unset to '
    "use the bundled default set."
)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise ValueError(f"calibration file {str(path)!r} does not exist. {_REMEDY}")
    if not path.is_file():
        raise ValueError(f"calibration path {str(path)!r} is not a file. {_REMEDY}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"calibration file {str(path)!r} is not valid UTF-8 text ({err.reason} at byte "
            f"{err.start}). Re-save it as UTF-8. {_REMEDY}"
        ) from None
    except OSError as err:
        raise ValueError(f"cannot read calibration file {str(path)!r}: {err}. {_REMEDY}") from None


def _parse_jsonl(path: Path, content: str) -> List[str]:
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"calibration file {str(path)!r}, line {number}: not valid JSON ({err.msg}). "
                f"{_REMEDY}"
            ) from None
        if isinstance(obj, str):
            text = obj
        elif isinstance(obj, dict):
            text = obj.get("text", obj.get("prompt"))
            if not isinstance(text, str):
                raise ValueError(
                    f"calibration file {str(path)!r}, line {number}: the object has no string "
                    f'"text" or "prompt" field (keys: {sorted(obj)}). {_REMEDY}'
                )
        else:
            raise ValueError(
                f"calibration file {str(path)!r}, line {number}: expected a JSON object, got "
                f"{type(obj).__name__}. {_REMEDY}"
            )
        if text.strip():
            texts.append(text)
    return texts


def default_token_budget(intermediate_size: int, head_dim: int = 0) -> int:
    """Calibration tokens used when ``calibration_samples`` is 0 (the default): twice the
    widest full-rank statistic (the MLP's ``intermediate_size`` neurons), at least 4096."""
    return max(DEFAULT_MIN_TOKENS, 2 * int(intermediate_size), 2 * int(head_dim))


def load_calibration(path: Optional[Union[str, Path]] = None, samples: int = 0) -> List[str]:
    """The first ``samples`` prompts of ``path`` (default: the bundled calibration set);
    ``samples=0``: all of them.

    ``.txt``: one prompt per line (blank lines skipped). ``.jsonl``: one JSON object per line
    with a ``"text"`` (or ``"prompt"``) field. Fewer prompts than ``samples`` is fine (all
    are returned); none at all is an error.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"calibration samples must be a positive integer (or 0: all), not {samples!r}")
    file = DEFAULT_CALIBRATION if path is None else Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise ValueError(
            f"calibration file {str(file)!r} has an unsupported extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}. {_REMEDY}"
        )
    content = _read_text(file)
    if suffix in JSONL_SUFFIXES:
        texts = _parse_jsonl(file, content)
    else:
        texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {str(file)!r} contains no prompts (it is empty). {_REMEDY}")
    return texts[:samples] if samples else texts


def _vocab_difference(a: Mapping[str, int], b: Mapping[str, int]) -> str:
    only_a, only_b = len(a.keys() - b.keys()), len(b.keys() - a.keys())
    moved = sum(1 for k in a.keys() & b.keys() if a[k] != b[k])
    return (f"{len(a)} vs {len(b)} entries; {only_a} only in the first, {only_b} only in the "
            f"second, {moved} with different ids")


def tokenize_calibration(
    tokenizers: Mapping[str, Any],
    texts: Sequence[str],
    max_tokens: int = 128,
    budget: Optional[int] = None,
) -> torch.LongTensor:
    """Token ids ``[n, T]`` shared by every model: the prompts packed into rows.

    Every tokenizer must have the same vocabulary (and must tokenize the prompts to the same
    ids): activation alignment feeds the *same* tokens to each model and compares what the
    models compute on them position by position. Each prompt is tokenized with the model's
    special tokens (e.g. a BOS), an EOS (when the tokenizer has one) separates prompts, and
    the stream is cut into rows of exactly ``max_tokens`` tokens (no padding, so every
    position is a real token; the incomplete tail is dropped). With fewer than
    ``max_tokens`` tokens in all, one shorter row is returned. ``budget``: keep only the
    first ``budget`` tokens (rounded up to whole rows).
    """
    if not tokenizers:
        raise ValueError("tokenize_calibration needs at least one tokenizer")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"calibration max_tokens must be a positive integer, not {max_tokens!r}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("no calibration prompts to tokenize (the list is empty)")
    names = list(tokenizers)
    first_name, first = names[0], tokenizers[names[0]]
    vocab = first.get_vocab()
    for name in names[1:]:
        other = tokenizers[name].get_vocab()
        if other != vocab:
            raise ValueError(
                f"models {first_name!r} and {name!r} have different tokenizer vocabularies "
                f"({_vocab_difference(vocab, other)}). Activation alignment runs every model on "
                f"the same token ids, so all models must share one tokenizer; use weight "
                f"alignment (alignment: weights) for these models."
            )

    def encode(tok):
        return [list(ids) for ids in tok(list(texts), add_special_tokens=True)["input_ids"]]

    ids = encode(first)
    for name in names[1:]:
        if encode(tokenizers[name]) != ids:
            raise ValueError(
                f"models {first_name!r} and {name!r} share a vocabulary but tokenize the "
                f"calibration prompts differently (different merges, normalizer or special "
                f"tokens). Activation alignment needs identical token ids for every model; use "
                f"weight alignment (alignment: weights) for these models."
            )
    eos = getattr(first, "eos_token_id", None)
    stream: List[int] = []
    for row in ids:
        stream.extend(row)
        if eos is not None and (not row or row[-1] != eos):
            stream.append(int(eos))
    if not stream:
        raise ValueError("the calibration prompts tokenize to no tokens at all")
    unk = getattr(first, "unk_token_id", None)
    if unk is not None:
        text_tokens = sum(len(row) for row in ids)
        unknown = sum(row.count(unk) for row in ids)
        if text_tokens and unknown > UNKNOWN_LIMIT * text_tokens:
            raise ValueError(
                f"{unknown / text_tokens:.0%} of the calibration tokens are the tokenizer's "
                f"unknown token {getattr(first, 'unk_token', unk)!r}: the text is not in the "
                f"models' vocabulary, so every model would see (nearly) the same input and the "
                f"alignment would be undetermined. Use calibration text in the models' language "
                f"and script (or leave calibration unset for the shipped set)."
            )
    if budget is not None:
        stream = stream[: -(-int(budget) // max_tokens) * max_tokens]
    if len(stream) < max_tokens:
        return torch.tensor([stream], dtype=torch.long)
    rows = len(stream) // max_tokens
    return torch.tensor(stream[: rows * max_tokens], dtype=torch.long).reshape(rows, max_tokens)


def check_enough_tokens(n_tokens: int, needed: int, what: str) -> None:
    """Refuse a statistic that cannot be full rank with ``n_tokens`` calibration tokens."""
    if n_tokens < needed:
        raise ValueError(
            f"{what} needs at least {needed} calibration tokens for a full-rank statistic, but "
            f"the calibration set has only {n_tokens}. Raise calibration_samples (more "
            f"prompts) or use a calibration file with more or longer prompts; prompts are "
            f"packed into rows of calibration_max_tokens tokens, so only the total number of "
            f"tokens counts (leave calibration_samples unset to use as much of the file as the "
            f"model needs; the shipped set is about 89,000 tokens with SmolLM2's tokenizer)."
        )


def load_tokenizer(path: str, revision: Optional[str] = None, trust_remote_code: bool = False,
                   name: Optional[str] = None):
    """A model's Hugging Face tokenizer, or a ValueError naming the model and the remedy."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ValueError(
            f"model {name or path}: cannot load its tokenizer ({err}); alignment: activations "
            f"needs each model's tokenizer to run it on the calibration text. Add the "
            f"tokenizer files, or use alignment: weights."
        ) from None


@lru_cache(maxsize=4)
def calibration_token_ids(
    models: Tuple[Tuple[str, str, Optional[str]], ...],
    calibration: Optional[str],
    samples: int,
    max_tokens: int,
    trust_remote_code: bool = False,
    budget: Optional[int] = None,
) -> torch.LongTensor:
    """The packed calibration token ids for ``models`` (``(name, path, revision)`` each),
    checked by :func:`tokenize_calibration`. Cached, so that the plan-time check and the
    alignment task tokenize once; callers must not modify the result."""
    tokenizers = {name: load_tokenizer(path, revision, trust_remote_code, name)
                  for name, path, revision in models}
    texts = load_calibration(calibration, samples)
    return tokenize_calibration(tokenizers, texts, max_tokens, budget)


def calibration_tokens(reference, models, calibration: Optional[str], samples: int, max_tokens: int,
                       trust_remote_code: bool = False) -> torch.Tensor:
    """The calibration token ids every model of an activation alignment runs on, tokenized
    with each model's tokenizer (which must agree); ``samples == 0``: as many prompts as
    the reference's width needs. Models are mergekit ``ModelReference``s (duck-typed: their
    ``config()`` and ``model.path`` / ``model.revision``). Cached: the plan-time check and
    the task share one call."""
    from .architectures import geometry_from_config

    budget = None
    if not samples:
        g = geometry_from_config(reference.config(trust_remote_code=trust_remote_code), str(reference))
        budget = default_token_budget(g.intermediate_size, g.head_dim)
    return calibration_token_ids(
        tuple((str(m), m.model.path, m.model.revision) for m in (reference, *models)),
        calibration, samples, max_tokens, trust_remote_code, budget,
    )
