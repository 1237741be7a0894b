"""Saved alignments: solved transforms on disk, reused by later merges of the same models.

Pure Python + torch + safetensors (no mergekit import, no pickle). An entry is two files in
the cache folder, ``<key>.safetensors`` (the elements) and ``<key>.json`` (what they are),
where ``key`` is a SHA-256 over everything the solve depended on: the kind of solve, the
plugin's cache format, the settings and geometry, and the bytes of every tensor it read
(both models, in 8 MiB blocks, each block's 128-bit XXH3 digest folded in), in a canonical
order. An entry is therefore only ever found for exactly the inputs it was solved from: a
changed checkpoint, setting or plugin format gives another key and the transform is solved
again. A file that cannot be read back (truncated, edited, another format) is reported and
solved again, never applied.

The key guards against stale entries (a changed input), not against an adversary: whoever
can write the cache folder can write any transform into it under the right key, whatever the
hash. So the tensor bytes go through XXH3 (``xxhash``, already installed with mergekit through
``datasets``), an order of magnitude faster than SHA-256, which would be most of a cached
merge's own cost; 128 bits make an accidental collision as unlikely as SHA-256's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import torch
import xxhash

LOG = logging.getLogger(__name__)
FORMAT = 4  # bump when what an entry means or its key changes (2: tensors hashed in blocks;
# 3: block digests by XXH3-128; 4: elements within groups.SNAP_DEVIATION of the identity snapped)


class Fingerprint:
    """Incremental SHA-256 over values and tensors (name, dtype, shape, and the XXH3-128
    digests of the raw bytes' blocks)."""

    def __init__(self, kind: str):
        self._hash = hashlib.sha256()
        self.update("format", FORMAT)
        self.update("kind", kind)

    def update(self, name: str, value: Any) -> "Fingerprint":
        self._hash.update(json.dumps([name, value], sort_keys=True, default=str).encode())
        return self

    def tensors(self, label: str, tensors: Mapping[str, torch.Tensor]) -> "Fingerprint":
        """Each tensor's bytes are hashed in blocks of :data:`HASH_BLOCK` bytes, the blocks'
        XXH3-128 digests on a thread pool (xxhash releases the GIL for large buffers), then
        folded in order into this hash."""
        names = sorted(tensors)
        jobs = []
        for name in names:
            tensor = tensors[name]
            if tensor is None:
                jobs.append((name, None, []))
                continue
            tensor = tensor.detach().contiguous()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            raw = memoryview(tensor.view(torch.uint8).numpy()).cast("B") if tensor.numel() else b""
            blocks = [raw[i:i + HASH_BLOCK] for i in range(0, len(raw), HASH_BLOCK)] or [b""]
            jobs.append((name, [str(tensor.dtype), list(tensor.shape)], blocks))
        digests = iter(_pool().map(xxhash.xxh3_128_digest,
                                   [block for _n, _m, blocks in jobs for block in blocks]))
        for name, meta, blocks in jobs:
            self.update(f"{label}:{name}", meta)
            for _ in blocks:
                self._hash.update(next(digests))
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


HASH_BLOCK = 8 << 20  # bytes per hashed block of a tensor


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)),
                              thread_name_prefix="symalign-hash")


class AlignmentCache:
    """A folder of saved alignments (``alignment_cache: DIR``)."""

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder).expanduser()

    def _paths(self, key: str) -> Tuple[Path, Path]:
        return self.folder / f"{key}.safetensors", self.folder / f"{key}.json"

    def load(self, key: str) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """``(tensors, meta)`` of a complete, readable entry, else None."""
        from safetensors.torch import load_file

        tensors_path, meta_path = self._paths(key)
        if not (tensors_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensors_path))
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError("format or key mismatch")
            if sorted(tensors) != sorted(meta.get("tensors", [])):
                raise ValueError("tensor list mismatch")
        except Exception as err:  # never apply what we cannot read back exactly
            LOG.warning("alignment cache entry %s in %s is unreadable (%s); solving again",
                        key[:12], self.folder, err)
            return None
        return tensors, meta

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Write an entry atomically (temporary files, then renames; json last)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors_path, meta_path = self._paths(key)
        body = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        info = {**meta, "format": FORMAT, "key": key, "tensors": sorted(body)}
        for path, write in ((tensors_path, lambda p: save_file(body, p)),
                            (meta_path, lambda p: Path(p).write_text(json.dumps(info, indent=1)))):
            self._write_atomically(path, write)

    def _write_atomically(self, path: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_record(self, key: str) -> Optional[Dict[str, float]]:
        """The distances saved next to entry ``key`` (:meth:`save_record`), else None."""
        path = self.folder / f"{key}.record.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("key") != key:
                raise ValueError("format or key mismatch")
            return {name: float(data[name]) for name in ("distance_before", "distance_after")}
        except (OSError, ValueError, KeyError, TypeError) as err:
            LOG.warning("alignment cache record %s unreadable (%s); measuring again", key[:12], err)
            return None

    def save_record(self, key: str, distances: Mapping[str, float]) -> None:
        """The model card's / report's distances before and after for entry ``key``: a
        function of the same inputs as the entry, so a cached merge need not measure them."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {**{k: float(v) for k, v in distances.items()}, "format": FORMAT, "key": key}
        self._write_atomically(self.folder / f"{key}.record.json",
                               lambda p: Path(p).write_text(json.dumps(data)))


def steps_to_tensors(steps: Iterable[Tuple[Any, torch.Tensor]], prefix: str = "") -> Tuple[Dict[str, torch.Tensor], list]:
    """A transform's ``(symmetry, element)`` steps as named tensors plus their order."""
    tensors, order = {}, []
    for i, (symmetry, element) in enumerate(steps):
        name = f"{prefix}{i}:{symmetry.name}"
        tensors[name] = element
        order.append(name)
    return tensors, order


def tensors_to_steps(tensors: Mapping[str, torch.Tensor], order: Iterable[str],
                     symmetries: Mapping[str, Any]) -> Tuple[Tuple[Any, torch.Tensor], ...]:
    """The inverse of :func:`steps_to_tensors`, the symmetries looked up by name (a name the
    current spec does not know makes the entry unusable: KeyError)."""
    return tuple((symmetries[name.split(":", 1)[1]], tensors[name]) for name in order)


# --------------------------------------------------------------------------- what is cached


def _fit_dict(fit) -> Optional[Dict[str, Any]]:
    if fit is None:
        return None
    return {"symmetry": fit.symmetry, "gain": fit.gain, "baseline": fit.baseline,
            "entries": fit.entries, "snapped": fit.snapped}


def _fit(data):
    from .spec import Fit

    return None if data is None else Fit(**data)


def weight_solve_settings(switches, qk_rotation: str, residual: str) -> Dict[str, Any]:
    """The settings a weight-based layer solve depends on (the same for every API)."""
    return {"alignment": "weights", "switches": [switches.permutation, switches.rotation,
                                                 switches.scaling],
            "qk_rotation": qk_rotation, "residual": residual}


def layer_key(settings: Mapping[str, Any], architecture: str, geometry: Any,
              model: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
              residual_key: Optional[str]) -> str:
    from dataclasses import asdict

    fp = Fingerprint("layer").update("settings", dict(settings)).update("architecture", architecture)
    fp.update("geometry", asdict(geometry)).update("residual", residual_key)
    return fp.tensors("model", model).tensors("reference", reference).hexdigest()


def save_layer(cache: AlignmentCache, key: str, transform) -> None:
    tensors, order = steps_to_tensors(transform.steps)
    cache.save(key, tensors, {"what": "layer", "order": order,
                              "fits": [_fit_dict(f) for f in transform.fits]})


def load_layer(cache: AlignmentCache, key: str, spec):
    from .spec import LayerTransform

    entry = cache.load(key)
    if entry is None:
        return None
    tensors, meta = entry
    try:
        steps = tensors_to_steps(tensors, meta["order"], {s.name: s for s in spec.symmetries()})
    except KeyError as err:
        LOG.warning("alignment cache entry %s names an unknown symmetry %s; solving again", key[:12], err)
        return None
    return LayerTransform(steps, tuple(_fit(f) for f in meta.get("fits", [])))


def residual_key(mode: str, architecture: str, rows: int, model: Mapping[str, torch.Tensor],
                 reference: Mapping[str, torch.Tensor]) -> str:
    fp = Fingerprint("residual").update("mode", mode).update("architecture", architecture)
    fp.update("rows", rows)
    return fp.tensors("model", model).tensors("reference", reference).hexdigest()


def save_residual(cache: AlignmentCache, key: str, element) -> None:
    tensors = {name: value for name, value in (("permutation", element.permutation),
                                               ("signs", element.signs),
                                               ("rotation", element.rotation)) if value is not None}
    cache.save(key, tensors, {"what": "residual", "mode": element.mode, "fit": _fit_dict(element.fit)})


def load_residual(cache: AlignmentCache, key: str):
    from .residual import ResidualElement

    entry = cache.load(key)
    if entry is None:
        return None
    tensors, meta = entry
    return ResidualElement(meta["mode"], tensors.get("permutation"), tensors.get("signs"),
                           tensors.get("rotation"), _fit(meta.get("fit")))


def activation_key(settings: Mapping[str, Any], token_ids: torch.Tensor,
                   models: Iterable[Tuple[str, Mapping[str, torch.Tensor]]]) -> str:
    """An activation alignment depends on the calibration tokens and on every weight of every
    model (the reference first): all of it is hashed."""
    fp = Fingerprint("activations").update("settings", dict(settings))
    fp.tensors("tokens", {"ids": token_ids})
    for i, (_label, tensors) in enumerate(models):
        fp.tensors(f"model{i}", tensors)
    return fp.hexdigest()


def save_activations(cache: AlignmentCache, key: str, results, elements, labels) -> None:
    """Per model (by position in ``labels``): each layer's steps, and its residual element."""
    tensors, meta = {}, {"what": "activations", "models": {}}
    for i, label in enumerate(labels):
        entry = {"layers": {}, "residual": None}
        for layer, transform in results[label].items():
            named, order = steps_to_tensors(transform.steps, prefix=f"{i}/{layer}/")
            tensors.update(named)
            entry["layers"][str(layer)] = {"order": order,
                                           "fits": [_fit_dict(f) for f in transform.fits]}
        element = elements.get(label)
        if element is not None:
            for name in ("permutation", "signs", "rotation"):
                value = getattr(element, name)
                if value is not None:
                    tensors[f"{i}/residual/{name}"] = value
            entry["residual"] = {"mode": element.mode, "fit": _fit_dict(element.fit)}
        meta["models"][str(i)] = entry
    cache.save(key, tensors, meta)


def load_activations(cache: AlignmentCache, key: str, labels, spec):
    """``(results, elements)`` as :func:`save_activations` stored them, or None."""
    from .residual import ResidualElement
    from .spec import LayerTransform

    entry = cache.load(key)
    if entry is None:
        return None
    tensors, meta = entry
    symmetries = {s.name: s for s in spec.symmetries()}
    results, elements = {}, {}
    try:
        for i, label in enumerate(labels):
            stored = meta["models"][str(i)]
            results[label] = {
                int(layer): LayerTransform(tensors_to_steps(tensors, info["order"], symmetries),
                                           tuple(_fit(f) for f in info["fits"]))
                for layer, info in stored["layers"].items()
            }
            if stored["residual"] is not None:
                elements[label] = ResidualElement(
                    stored["residual"]["mode"], tensors.get(f"{i}/residual/permutation"),
                    tensors.get(f"{i}/residual/signs"), tensors.get(f"{i}/residual/rotation"),
                    _fit(stored["residual"]["fit"]))
    except KeyError as err:
        LOG.warning("alignment cache entry %s does not match this merge (%s); solving again",
                    key[:12], err)
        return None
    return results, elements
