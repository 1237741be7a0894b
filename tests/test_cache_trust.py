"""The alignment cache is untrusted input (issue 28): an entry is applied only if its
checksums match and every element is an element of its group, of the shape the spec says;
otherwise a warning names its file and the transform is solved again. Entries are written as
a pair, so an interrupted write never leaves an entry that a later merge applies.

Every case compares with the same merge (or state-dict alignment) solved without a cache:
the result must be bit-for-bit equal.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .support import aligned_recipe, run_recipe
from mergekit_symalign import cache
from mergekit_symalign.statedict import align_state_dict, scramble_state_dict

from .conftest import load, make_config, make_model, perturbed

OWN = ("format", "key", "tensors", "data_sha256", "meta_sha256")


# --------------------------------------------------------------------------- helpers


def entries(folder: Path, what: str):
    """The .json files of entries of kind ``what`` (layer, residual, activations)."""
    return sorted(p for p in Path(folder).glob("*.json")
                  if not p.name.endswith(".record.json") and json.loads(p.read_text())["what"] == what)


def resave(meta_path: Path, edit) -> None:
    """Rewrite an entry with edited tensors and *valid* checksums: only the group checks
    stand between it and the merge."""
    tensors = load_file(str(meta_path.with_suffix(".safetensors")))
    edit(tensors)
    meta = {k: v for k, v in json.loads(meta_path.read_text()).items() if k not in OWN}
    cache.AlignmentCache(meta_path.parent).save(meta_path.stem, tensors, meta)


def flip_bit(path: Path, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, name: str) -> int:
    """Byte offset of tensor ``name``'s data in a safetensors file."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    return 8 + size + header[name]["data_offsets"][0]


def snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Solves:
    """Counts layer and residual solves (state-dict API and merges)."""

    def __init__(self, monkeypatch):
        import mergekit_symalign.residual as res
        import mergekit_symalign.solve as solve

        self.calls = 0
        real_layer, real_residual = solve.align_layer, res.solve

        def layer(*a, **k):
            self.calls += 1
            return real_layer(*a, **k)

        def residual(*a, **k):
            self.calls += 1
            return real_residual(*a, **k)

        monkeypatch.setattr(solve, "align_layer", layer)  # the one solve: merges and statedict
        monkeypatch.setattr(res, "solve", residual)


def recipe(family, folder=None, residual="permutation"):
    params = {"residual": residual}
    if folder is not None:
        params["alignment_cache"] = str(folder)
    return aligned_recipe("symmetry_aligned_task_arithmetic", family["sibling_scrambled"],
                          family["reference"], [family["skill_scrambled"]], **params)


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    """A merge with residual: permutation solved without a cache, and a clean cache of it."""
    root = tmp_path_factory.mktemp("cache_trust")
    want = load(run_recipe(recipe(family), root / "fresh"))
    run_recipe(recipe(family, root / "clean"), root / "cached")
    return want, root / "clean"


def merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt):
    """Copy the clean cache, corrupt it, merge with it: (result, warnings, solves, file)."""
    want, clean = merged
    folder = tmp_path / "cache"
    shutil.copytree(clean, folder)
    target = corrupt(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.stem != target.stem}
    solves = Solves(monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
        got = load(run_recipe(recipe(family, folder), tmp_path / "out"))
    monkeypatch.undo()
    assert equal(got, want), "a corrupted cache entry changed the merge"
    # the other entries were only read (the corrupted one is rewritten by the new solve)
    assert {n: b for n, b in snapshot(folder).items() if n in before} == before
    return caplog.text, solves.calls, target


# --------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("checksum", ["stale", "valid"])
def test_duplicated_index_in_a_cached_residual_permutation(family, merged, tmp_path, caplog,
                                                          monkeypatch, checksum):
    def corrupt(folder):
        (target,) = entries(folder, "residual")[:1]
        def duplicate(t):
            t["permutation"][1] = t["permutation"][0]
        if checksum == "valid":
            resave(target, duplicate)
        else:
            data = target.with_suffix(".safetensors")
            raw = bytearray(data.read_bytes())
            at = tensor_offset(data, "permutation")
            raw[at + 8:at + 16] = raw[at:at + 8]
            data.write_bytes(bytes(raw))
        return target

    text, calls, target = merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt)
    assert str(target) in text and calls == 1
    assert ("repeated or out-of-range index" if checksum == "valid" else "checksum") in text


@pytest.mark.parametrize("checksum", ["stale", "valid"])
def test_one_bit_exponent_flip_in_a_cached_rotation(family, merged, tmp_path, caplog,
                                                   monkeypatch, checksum):
    def corrupt(folder):
        target = entries(folder, "layer")[0]
        name = next(k for k in load_file(str(target.with_suffix(".safetensors")))
                    if k.endswith("vo_rotation"))

        def flip(t):  # the lowest exponent bit of the largest entry: it doubles or halves
            flat = t[name].view(-1)
            i = int(flat.abs().argmax())
            flat.view(torch.int64)[i] ^= 1 << 52
        if checksum == "valid":
            resave(target, flip)
        else:
            data = target.with_suffix(".safetensors")
            t = load_file(str(data))
            i = int(t[name].view(-1).abs().argmax())
            flip_bit(data, 8 * (tensor_offset(data, name) + 8 * i) + 52)
        return target

    text, calls, target = merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt)
    assert str(target) in text and calls == 1
    assert ("not orthogonal" if checksum == "valid" else "checksum") in text


@pytest.mark.parametrize("checksum", ["stale", "valid"])
@pytest.mark.parametrize("what,name", [("residual", "permutation"), ("layer", "mlp.neurons")])
def test_bit_flip_in_a_cached_int64_index(family, merged, tmp_path, caplog, monkeypatch,
                                          checksum, what, name):
    def corrupt(folder):
        target = entries(folder, what)[0]
        data = target.with_suffix(".safetensors")
        full = next(k for k in load_file(str(data)) if k.endswith(name))

        def flip(t):
            t[full][3] ^= 1 << 40
        if checksum == "valid":
            resave(target, flip)
        else:
            flip_bit(data, 8 * (tensor_offset(data, full) + 8 * 3) + 40)
        return target

    text, calls, target = merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt)
    assert str(target) in text and calls == 1


@pytest.mark.parametrize("edit,why", [
    (lambda t, n: t.__setitem__(n["signs"], t[n["signs"]] * 2), "+-1"),
    (lambda t, n: t.__setitem__(n["permutation"], t[n["permutation"]][:-1].clone()), "permutation of"),
    (lambda t, n: t[n["mlp.neuron_scale"]].__setitem__(0, float("inf")), "finite"),
    (lambda t, n: t[n["mlp.neuron_scale"]].__setitem__(0, 0.0), "finite and non-zero"),
    (lambda t, n: t.__setitem__(n["vo_rotation"], t[n["vo_rotation"]][:, :-1, :-1].clone()), "rotations of"),
    (lambda t, n: t[n["q_heads"]].__setitem__(0, t[n["q_heads"]][-1].item()), "permutation"),
])
def test_element_outside_its_group_with_valid_checksums(family, merged, tmp_path, caplog,
                                                        monkeypatch, edit, why):
    """Group membership and shape are checked even where the checksums match."""
    def corrupt(folder):
        for target in entries(folder, "layer") + entries(folder, "residual"):
            names = {k.split(":", 1)[-1]: k for k in load_file(str(target.with_suffix(".safetensors")))}
            names = {**names, **{k.rsplit(".", 1)[-1]: v for k, v in names.items()}}
            try:
                resave(target, lambda t: edit(t, names))
            except KeyError:
                continue
            return target
        raise AssertionError("no entry has the tensor")

    text, calls, target = merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt)
    assert str(target) in text and why in text and calls == 1


def test_cached_residual_rotation_checked(tmp_path, caplog, monkeypatch):
    """residual: orthogonal: a D x D rotation scaled by 1.01 (valid checksum) is refused."""
    config = make_config("llama")
    ref = make_model("llama", seed=0)
    scrambled, _ = scramble_state_dict(perturbed(ref, seed=1, scale=0.05), config, seed=12,
                                       residual="orthogonal")
    reference = ref.state_dict()
    want, _ = align_state_dict(reference, scrambled, config, residual="orthogonal")
    folder = tmp_path / "cache"
    align_state_dict(reference, scrambled, config, residual="orthogonal", cache=str(folder))
    target = entries(folder, "residual")[0]
    resave(target, lambda t: t.__setitem__("rotation", t["rotation"] * 1.01))
    solves = Solves(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
        got, _ = align_state_dict(reference, scrambled, config, residual="orthogonal", cache=str(folder))
    assert equal(got, want) and str(target) in caplog.text and "not orthogonal" in caplog.text
    assert solves.calls == 1


def test_json_edits_are_caught_by_its_checksum(family, merged, tmp_path, caplog, monkeypatch):
    def corrupt(folder):
        target = entries(folder, "layer")[0]
        meta = json.loads(target.read_text())
        meta["order"] = meta["order"][:-1]  # one step fewer: a transform that is not the solve
        target.write_text(json.dumps(meta))
        return target

    text, calls, target = merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt)
    assert str(target) in text and "checksum" in text and calls == 1


def test_data_without_json_is_no_entry_and_is_overwritten(family, merged, tmp_path, caplog, monkeypatch):
    def corrupt(folder):
        target = entries(folder, "layer")[0]
        target.unlink()  # as a write interrupted before its commit leaves it
        target.with_suffix(".safetensors").write_bytes(b"half a write")
        return target

    text, calls, target = merge_with_corrupted(family, merged, tmp_path, caplog, monkeypatch, corrupt)
    assert calls == 1 and "alignment cache" not in text  # nothing to warn about: no entry
    assert cache.AlignmentCache(target.parent).load(target.stem) is not None  # written again


def test_cached_activation_entry_is_checked(tmp_path, caplog, monkeypatch):
    """alignment: activations (with the residual stream): a duplicated index in a cached
    permutation (valid checksum) and a bit flip (stale checksum) are each solved again."""
    from .conftest import scrambled_pair_with_tokenizers, word_calibration

    paths = scrambled_pair_with_tokenizers(tmp_path)
    calibration = word_calibration(tmp_path / "c.txt")

    def rec(folder=None):
        extra = {"alignment_cache": str(folder)} if folder else {}
        return aligned_recipe("symmetry_aligned_task_arithmetic", paths["base"], paths["reference"],
                              [paths["skill"]], alignment="activations", residual="permutation",
                              calibration=calibration, calibration_max_tokens=32, **extra)

    want = load(run_recipe(rec(), tmp_path / "fresh"))
    folder = tmp_path / "cache"
    run_recipe(rec(folder), tmp_path / "first")
    (target,) = entries(folder, "activations")
    data = target.with_suffix(".safetensors")
    clean = {p: p.read_bytes() for p in (target, data)}
    name = next(k for k in load_file(str(data)) if k.endswith("mlp.neurons"))

    def duplicate(t):
        t[name][1] = t[name][0]

    for corrupt, why in ((lambda: resave(target, duplicate), "repeated or out-of-range index"),
                         (lambda: flip_bit(data, 8 * tensor_offset(data, name) + 3), "checksum")):
        for p, b in clean.items():
            p.write_bytes(b)
        corrupt()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
            got = load(run_recipe(rec(folder), tmp_path / f"again-{why[:5]}"))
        assert equal(got, want) and str(target) in caplog.text and why in caplog.text


# --------------------------------------------------------------------------- fault injection


@pytest.fixture(scope="module", params=["permutation", "orthogonal"])
def state_dicts(request, tmp_path_factory):
    """A reference and a scrambled skill, the alignment solved without a cache, and a clean
    cache of it (the residual stream and every layer)."""
    residual = request.param
    config = make_config("llama")
    ref = make_model("llama", seed=0)
    skill = perturbed(ref, seed=1, scale=0.05)
    scrambled, _ = scramble_state_dict(skill, config, seed=12, residual=residual)
    reference = ref.state_dict()
    want, _ = align_state_dict(reference, scrambled, config, residual=residual)
    clean = tmp_path_factory.mktemp(f"clean-{residual}")
    align_state_dict(reference, scrambled, config, residual=residual, cache=str(clean))
    return reference, scrambled, config, residual, want, clean


FAULT_TRIALS = 110  # per residual mode: 220 in all


def corrupt_randomly(rng: random.Random, folder: Path) -> Path:
    """One random single-bit flip or truncation of one random file of an entry; returns
    the entry's .json."""
    files = sorted(p for p in folder.iterdir() if not p.name.endswith(".record.json"))
    victim = rng.choice(files)
    data = victim.read_bytes()
    if rng.random() < 0.7:
        bit = rng.randrange(8 * len(data))
        flip_bit(victim, bit)
    else:
        victim.write_bytes(data[:rng.randrange(len(data))])
    return victim.with_suffix(".json")


def test_random_bit_flips_and_truncations_never_change_the_alignment(state_dicts, tmp_path,
                                                                     caplog, monkeypatch):
    reference, scrambled, config, residual, want, clean = state_dicts
    rng = random.Random(f"faults-{residual}")
    solves = Solves(monkeypatch)
    outcomes = {"reused": 0, "solved again": 0}
    for trial in range(FAULT_TRIALS):
        folder = tmp_path / f"t{trial}"
        shutil.copytree(clean, folder)
        entry = corrupt_randomly(rng, folder)
        solves.calls = 0
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
            got, _ = align_state_dict(reference, scrambled, config, residual=residual, cache=str(folder))
        assert equal(got, want), f"trial {trial}: a corrupted entry changed the alignment"
        warned = str(entry) in caplog.text
        # a corrupted entry is either read back as it was written (e.g. 'e' -> 'E' in a
        # float of its .json) and reused, or named in a warning and solved again
        assert solves.calls == (1 if warned else 0), (trial, entry.name, caplog.text)
        outcomes["solved again" if warned else "reused"] += 1
        shutil.rmtree(folder)
    assert outcomes["solved again"] > 0.9 * FAULT_TRIALS, outcomes


MERGE_FAULT_TRIALS = 8


def test_random_corruption_through_a_real_merge(family, merged, tmp_path, caplog, monkeypatch):
    want, clean = merged
    rng = random.Random("merge-faults")
    for trial in range(MERGE_FAULT_TRIALS):
        folder = tmp_path / f"cache{trial}"
        shutil.copytree(clean, folder)
        entry = corrupt_randomly(rng, folder)
        solves = Solves(monkeypatch)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
            got = load(run_recipe(recipe(family, folder), tmp_path / f"out{trial}"))
        monkeypatch.undo()
        assert equal(got, want), f"trial {trial}"
        warned = str(entry) in caplog.text
        # a re-solved residual invalidates no layer entry: at most the corrupted one is solved
        assert solves.calls == (1 if warned else 0), (trial, entry.name, caplog.text)


# --------------------------------------------------------------------------- interrupts


class _Interrupting:
    """``os`` for the cache module, raising KeyboardInterrupt at its ``at``-th file
    operation (the synced temporary writes, the unlink of an old .json, the renames, the
    folder sync): a SIGINT at that point of a write."""

    def __init__(self, at: int):
        import os

        self._os, self.at, self.count = os, at, 0

    def _tick(self):
        self.count += 1
        if self.count == self.at:
            raise KeyboardInterrupt

    def __getattr__(self, name):
        real = getattr(self._os, name)
        if name in ("replace", "unlink", "fsync", "fdopen"):
            def op(*a, **k):
                self._tick()
                return real(*a, **k)
            return op
        return real


def test_interrupted_writes_never_leave_an_entry_that_is_applied(state_dicts, tmp_path, monkeypatch, caplog):
    """Interrupt the cache writes of an alignment at every file operation in turn (a fresh
    cache, and one whose entries are all being rewritten): what is left is either a complete
    entry (checksums and groups pass) or no entry, no temporary file is left behind, and the
    next alignment with that cache is exact."""
    reference, scrambled, config, residual, want, clean = state_dicts

    def run(folder):
        return align_state_dict(reference, scrambled, config, residual=residual, cache=str(folder))[0]

    def prepare(folder, start):
        if start == "stale":  # every entry present but unusable: each is rewritten
            shutil.copytree(clean, folder)
            for p in folder.glob("*.safetensors"):
                flip_bit(p, 8 * len(p.read_bytes()) - 1)

    trials, expected = 0, 0
    for start in ("empty", "stale"):
        # how many file operations one alignment's writes take
        probe = _Interrupting(at=0)
        prepare(tmp_path / f"probe-{start}", start)
        monkeypatch.setattr(cache, "os", probe)
        run(tmp_path / f"probe-{start}")
        monkeypatch.undo()
        total = probe.count
        expected += total
        assert total >= 5 * len(list(clean.glob("*.json")))
        for at in range(1, total + 1):
            folder = tmp_path / f"{start}-{at}"
            prepare(folder, start)
            monkeypatch.setattr(cache, "os", _Interrupting(at))
            with pytest.raises(KeyboardInterrupt):
                run(folder)
            monkeypatch.undo()
            trials += 1
            assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary file left"
            for meta in folder.glob("*.json"):
                # an entry whose .json is there is complete: it loads without a warning
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
                    loaded = cache.AlignmentCache(folder).load(meta.stem)
                assert (loaded is not None) or start == "stale", (at, meta.name, caplog.text)
            assert equal(run(folder), want), f"interrupted at file operation {at} of {total}"
    assert trials == expected  # every file operation of both kinds of write


def test_sigint_during_cached_merges(family, tmp_path):
    """A real SIGINT at random times of a merge with a cache (separate processes): the
    next merge with that cache is exact, and every entry in it is complete."""
    import os
    import signal
    import subprocess
    import sys
    import time

    want = load(run_recipe(recipe(family), tmp_path / "fresh"))
    folder = tmp_path / "cache"
    script = tmp_path / "merge.py"
    script.write_text(
        "import sys, json\n"
        "from tests.support import run_recipe\n"
        "run_recipe(json.loads(sys.argv[1]), sys.argv[2])\n")
    rng = random.Random("sigint")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    interrupted = 0
    for trial in range(3):
        shutil.rmtree(folder, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, str(script), json.dumps(recipe(family, folder)),
                                 str(tmp_path / f"out{trial}")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait for the first entry to appear, then interrupt at a random moment after it
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not list(folder.glob("*")):
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGINT)
        interrupted += proc.wait(timeout=120) != 0
        for meta in folder.glob("*.json"):
            if not meta.name.endswith(".record.json"):
                assert cache.AlignmentCache(folder).load(meta.stem) is not None, meta
        got = load(run_recipe(recipe(family, folder), tmp_path / f"again{trial}"))
        assert equal(got, want), f"trial {trial}"
    assert interrupted, "no merge was interrupted: the SIGINTs came too late to test anything"
