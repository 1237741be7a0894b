"""Saved alignments: solved transforms on disk, reused by later merges of the same models.

Pure Python + torch + safetensors (no mergekit import, no pickle). An entry is two files in
the cache folder, ``<key>.safetensors`` (the elements) and ``<key>.json`` (what they are),
where ``key`` is a SHA-256 over everything the solve depended on: the kind of solve, the
plugin's cache format, the settings and geometry, and the bytes of every tensor it read
(both models, in 8 MiB blocks, each block's 128-bit XXH3 digest folded in), in a canonical
order. An entry is therefore only ever found for exactly the inputs it was solved from: a
changed checkpoint, setting or plugin format gives another key and the transform is solved
again.

An entry is untrusted input when it is read back. Its ``.json`` carries the SHA-256 of the
``.safetensors`` bytes and of its own content; every element is then checked to be an element
of its group, of the shape the layer's spec (or the residual stream's width) says: a
permutation of the right size (within its blocks), signs of +-1, rotations orthogonal to
:data:`ORTHOGONALITY_TOLERANCE`, finite non-zero scales (positive where the group is
unsigned). An entry that fails any of this (truncated, bit-flipped, edited, another format)
is reported, naming its file, and solved again: never applied. Entries are written as a pair:
both files to temporary names and synced, the old ``.json`` removed, the data renamed into
place and the ``.json`` (the commit) last, so an interrupted write leaves at most a data file
without its ``.json``, which is never read and is overwritten by the next save.

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
FORMAT = 5  # bump when what an entry means or its key changes (2: tensors hashed in blocks;
# 3: block digests by XXH3-128; 4: elements within groups.SNAP_DEVIATION of the identity snapped;
# 5: the .json carries SHA-256 checksums of the data and of itself)

# max |R^T R - I| of a stored rotation: solved rotations are stored in float64, orthogonal to
# ~2e-15 on the test models, and the tolerance leaves room for float32 solves; a flipped
# exponent bit of a large entry is off by far more. (Smaller corruptions are the checksums'.)
ORTHOGONALITY_TOLERANCE = 1e-4


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
        """``(tensors, meta)`` of a complete entry whose checksums match, else None (with a
        warning naming the file, unless there is no ``.json``: then there is no entry)."""
        from safetensors.torch import load as load_bytes

        tensors_path, meta_path = self._paths(key)
        if not meta_path.is_file():
            return None  # no entry (a data file without its .json is an interrupted write)
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError("format or key mismatch")
            if meta.get("meta_sha256") != _meta_digest(meta):
                raise ValueError("its .json does not match its checksum")
            data = tensors_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta.get("data_sha256"):
                raise ValueError(f"{tensors_path.name} does not match the checksum in its .json")
            tensors = load_bytes(data)
            if sorted(tensors) != sorted(meta.get("tensors", [])):
                raise ValueError("tensor list mismatch")
        except Exception as err:  # never apply what we cannot read back exactly
            self.reject(key, f"unreadable ({type(err).__name__}: {err})")
            return None
        return tensors, meta

    def reject(self, key: str, why: str) -> None:
        """Warn that entry ``key`` is not used, naming its file (it is solved again)."""
        LOG.warning("alignment cache entry %s is %s; solving again (it is not applied)",
                    self._paths(key)[1], why)

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Write an entry as a pair (see the module docstring): both files to temporary
        names, synced; the old .json removed; the data renamed into place; the .json last."""
        from safetensors.torch import save as save_bytes

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors_path, meta_path = self._paths(key)
        body = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        data = save_bytes(body)
        info = {**meta, "format": FORMAT, "key": key, "tensors": sorted(body),
                "data_sha256": hashlib.sha256(data).hexdigest()}
        info["meta_sha256"] = _meta_digest(info)
        temporary = []
        try:
            temporary.append(self._temporary(tensors_path, data))
            temporary.append(self._temporary(meta_path, json.dumps(info, indent=1).encode()))
            if meta_path.exists():  # an older entry: never a new data file under its .json
                os.unlink(meta_path)
            os.replace(temporary[0], tensors_path)
            os.replace(temporary[1], meta_path)  # the commit
            _sync_folder(self.folder)
        finally:
            for tmp in temporary:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _temporary(self, path: Path, data: bytes) -> str:
        """``data`` in a synced temporary file next to ``path`` (its name)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

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


def _meta_digest(info: Mapping[str, Any]) -> str:
    """SHA-256 of an entry's .json content, its own checksum left out (canonical form)."""
    body = {k: v for k, v in info.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (where the platform can sync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- group membership


def _orthogonality_error(matrices: torch.Tensor) -> float:
    """max |R^T R - I| over a stack of square matrices; a large one (the residual stream's
    D x D) by 8 random probes instead (``|R^T R v - v|``, O(D^2) rather than O(D^3))."""
    r = matrices.double()
    k = r.shape[-1]
    if k <= 512:
        eye = torch.eye(k, dtype=torch.float64)
        return float((r.transpose(-1, -2) @ r - eye).abs().max()) if r.numel() else 0.0
    probes = torch.randn(k, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    back = r.transpose(-1, -2) @ (r @ probes)
    return float(((back - probes).norm(dim=-2) / probes.norm(dim=0)).max())


def _permutation_problem(element: torch.Tensor, size: int, block: int = 0) -> Optional[str]:
    if element.dtype not in (torch.int64, torch.int32) or tuple(element.shape) != (size,):
        return f"not a permutation of {size} (dtype {element.dtype}, shape {tuple(element.shape)})"
    if not torch.equal(torch.sort(element.long()).values, torch.arange(size)):
        return f"not a permutation of {size} (a repeated or out-of-range index)"
    if block and not bool((element.long() // block == torch.arange(size) // block).all()):
        return f"a permutation that moves slots across blocks of {block}"
    return None


def _signs_problem(element: torch.Tensor, size: int) -> Optional[str]:
    if not element.is_floating_point() or tuple(element.shape) != (size,):
        return f"not {size} signs (dtype {element.dtype}, shape {tuple(element.shape)})"
    if not bool((element.abs() == 1).all()):
        return "signs that are not all +-1"
    return None


def element_problem(symmetry, element: torch.Tensor) -> Optional[str]:
    """Why ``element`` is not an element of ``symmetry``'s group as the spec declares it (its
    shape, and membership), or None."""
    from .groups import Kind

    n, k, kind = symmetry.slots, symmetry.coords, symmetry.kind
    if not isinstance(element, torch.Tensor):
        return "not a tensor"
    if kind == Kind.permutation:
        return _permutation_problem(element, n, symmetry.block_size)
    if kind == Kind.sign:
        return _signs_problem(element, n)
    if kind == Kind.scale:
        if not element.is_floating_point() or tuple(element.shape) != (n,):
            return f"not {n} scales (dtype {element.dtype}, shape {tuple(element.shape)})"
        if not bool(torch.isfinite(element).all()) or bool((element == 0).any()):
            return "scales that are not finite and non-zero"
        if not symmetry.signed and bool((element < 0).any()):
            return "negative scales for a group of positive ones"
        return None
    if not element.is_floating_point() or tuple(element.shape) != (n, k, k):
        return f"not {n} rotations of {k} x {k} (dtype {element.dtype}, shape {tuple(element.shape)})"
    return _rotation_problem(element, "rotations")


def _rotation_problem(rotation: torch.Tensor, what: str) -> Optional[str]:
    """Why finite, orthogonal ``rotation`` (one matrix or a stack) is not: NaN/Inf entries,
    or max |R^T R - I| above :data:`ORTHOGONALITY_TOLERANCE`."""
    if not bool(torch.isfinite(rotation).all()):
        return f"{what}: NaN/Inf entries"
    error = _orthogonality_error(rotation)
    if not error <= ORTHOGONALITY_TOLERANCE:
        return f"{what}: not orthogonal (max |R^T R - I| = {error:.3g})"
    return None


def residual_problem(element, dim: Optional[int] = None) -> Optional[str]:
    """Why a residual-stream element is not one of its group (of width ``dim``, when known)."""
    if element.mode == "permutation":
        if element.permutation is None or element.rotation is not None:
            return "a residual permutation without its permutation (or with a rotation)"
        size = dim if dim is not None else len(element.permutation)
        problem = _permutation_problem(element.permutation, size)
        if problem is None and element.signs is not None:
            problem = _signs_problem(element.signs, size)
        return problem and f"residual {problem}"
    if element.mode == "orthogonal":
        r = element.rotation
        if r is None or element.permutation is not None or element.signs is not None:
            return "a residual rotation without its rotation (or with a permutation)"
        size = dim if dim is not None else (r.shape[0] if r.dim() else 0)
        if not r.is_floating_point() or tuple(r.shape) != (size, size):
            return f"not a residual rotation of {size} x {size} (shape {tuple(r.shape)})"
        return _rotation_problem(r, "a residual rotation")
    return f"a residual element of unknown mode {element.mode!r}"


def steps_problem(steps) -> Optional[str]:
    for symmetry, element in steps:
        problem = element_problem(symmetry, element)
        if problem is not None:
            return f"{symmetry.name}: {problem}"
    return None


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
        problem = steps_problem(steps)
        fits = tuple(_fit(f) for f in meta.get("fits", []))
    except (KeyError, TypeError, ValueError) as err:
        cache.reject(key, f"not an entry of this layer's spec ({type(err).__name__}: {err})")
        return None
    if problem is not None:
        cache.reject(key, f"not an element of the layer's group ({problem})")
        return None
    return LayerTransform(steps, fits)


# The residual stream's width implied by each residual key's inputs (the key hashes their
# shapes, so this is a function of the key): what load_residual checks an entry against.
_RESIDUAL_WIDTH: Dict[str, int] = {}


def residual_key(mode: str, architecture: str, rows: int, model: Mapping[str, torch.Tensor],
                 reference: Mapping[str, torch.Tensor]) -> str:
    fp = Fingerprint("residual").update("mode", mode).update("architecture", architecture)
    fp.update("rows", rows)
    key = fp.tensors("model", model).tensors("reference", reference).hexdigest()
    from .architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(architecture)
    embed = reference.get(arch.embed) if arch is not None else None
    if embed is not None and embed.dim() == 2:
        _RESIDUAL_WIDTH[key] = int(embed.shape[1])
    return key


def save_residual(cache: AlignmentCache, key: str, element) -> None:
    tensors = {name: value for name, value in (("permutation", element.permutation),
                                               ("signs", element.signs),
                                               ("rotation", element.rotation)) if value is not None}
    cache.save(key, tensors, {"what": "residual", "mode": element.mode, "fit": _fit_dict(element.fit)})


def load_residual(cache: AlignmentCache, key: str, dim: Optional[int] = None):
    """The residual element of entry ``key`` (of width ``dim``: by default the width the
    key's inputs had), or None."""
    from .residual import ResidualElement

    entry = cache.load(key)
    if entry is None:
        return None
    tensors, meta = entry
    try:
        element = ResidualElement(meta["mode"], tensors.get("permutation"), tensors.get("signs"),
                                  tensors.get("rotation"), _fit(meta.get("fit")))
    except (KeyError, TypeError, ValueError) as err:
        cache.reject(key, f"not a residual entry ({type(err).__name__}: {err})")
        return None
    problem = residual_problem(element, dim if dim is not None else _RESIDUAL_WIDTH.get(key))
    if problem is not None:
        cache.reject(key, f"not an element of the residual stream's group ({problem})")
        return None
    return element


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
        problem = next((f"model {i}, layer {layer}: {p}"
                        for i, label in enumerate(labels)
                        for layer, transform in results[label].items()
                        for p in [steps_problem(transform.steps)] if p), None)
        widths = {e.dim for e in elements.values() if e is not None}
        problem = problem or next((f"model {labels.index(label)}: {p}"
                                   for label, element in elements.items()
                                   for p in [residual_problem(element)] if p), None)
        if problem is None and len(widths) > 1:
            problem = f"residual elements of different widths {sorted(widths)}"
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        cache.reject(key, f"not an entry of this merge ({type(err).__name__}: {err})")
        return None
    if problem is not None:
        cache.reject(key, f"not an element of the models' groups ({problem})")
        return None
    return results, elements
