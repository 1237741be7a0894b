"""Ctrl-C at random points of an aligned merge with an alignment cache (issue 28), many trials
in this process on the tiny family: a KeyboardInterrupt (what Python's SIGINT handler raises
where the signal lands) is raised at the N-th of every task's ``execute``, layer and residual
solve, cache read and cache file operation, N drawn over a clean merge's count. After every
trial: no output folder (none existed before; one that existed is kept), and the cache holds
only complete entries that pass cache.py's own checks. After all trials, a merge with each
cache so left is exact: tensor for tensor equal to the merge without a cache.

test_cache_trust interrupts every file operation of the cache's writes of a state-dict
alignment; test_cleanup and test_cache_trust send real SIGINTs to a few merges in
subprocesses. This one covers the whole merge, cheaply enough for many trials.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from .support import aligned_recipe, run_recipe
from mergekit_symalign import cache

from .conftest import load

ENTRY = re.compile(r"^[0-9a-f]{64}\.(safetensors|json|record\.json)$")
INTERRUPTED_TRIALS = 48  # trials in which the interrupt landed (completed ones come on top)


def recipe(family, folder=None):
    """test_cache_trust's recipe: residual and layer solves, each cached when ``folder``."""
    cached = {} if folder is None else {"alignment_cache": str(folder)}
    return aligned_recipe("symmetry_aligned_task_arithmetic", family["sibling_scrambled"],
                          family["reference"], [family["skill_scrambled"]],
                          residual="permutation", **cached)


class Tripwire:
    """Counts calls of the merge's hot points; raises KeyboardInterrupt at call ``at``
    (never when ``at`` is 0: then it only counts). Returns the name of the point it hit."""

    def __init__(self):
        self.at, self.count, self.hit, self.calls = 0, 0, None, []

    def arm(self, at: int) -> None:
        self.at, self.count, self.hit, self.calls = at, 0, None, []

    def tick(self, where: str) -> None:
        self.count += 1
        if not self.at:
            self.calls.append(where)
        if self.count == self.at:
            self.hit = where
            raise KeyboardInterrupt(f"tripwire at call {self.at} ({where})")

    def wrap(self, where: str, real):
        def tripped(*args, **kwargs):
            self.tick(where)
            return real(*args, **kwargs)

        return tripped


class _CacheOs:
    """``os`` for cache.py: its file operations (synced temporary writes, the unlink of an
    old .json, the renames, the folder sync) tick the tripwire first."""

    OPS = ("replace", "unlink", "fsync", "fdopen")

    def __init__(self, tripwire: Tripwire):
        import os

        self._os, self._tripwire = os, tripwire

    def __getattr__(self, name):
        real = getattr(self._os, name)
        return self._tripwire.wrap(f"cache os.{name}", real) if name in self.OPS else real


def _task_classes():
    """Every mergekit Task class that defines its own execute (mergekit's and the plugin's)."""
    from mergekit.graph import Task

    import mergekit_symalign.tasks  # noqa: F401  (the plugin's tasks, imported: subclasses)

    seen, todo = [], [Task]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return [cls for cls in seen if "execute" in cls.__dict__]


@pytest.fixture
def tripwire(monkeypatch):
    import mergekit_symalign.residual as res
    import mergekit_symalign.solve as solve

    wire = Tripwire()
    for cls in _task_classes():
        monkeypatch.setattr(cls, "execute", wire.wrap(f"{cls.__name__}.execute", cls.__dict__["execute"]))
    monkeypatch.setattr(solve, "align_layer", wire.wrap("solve.align_layer", solve.align_layer))
    monkeypatch.setattr(res, "solve", wire.wrap("residual.solve", res.solve))
    monkeypatch.setattr(cache.AlignmentCache, "load",
                        wire.wrap("AlignmentCache.load", cache.AlignmentCache.load))
    monkeypatch.setattr(cache, "os", _CacheOs(wire))
    return wire


def equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_stale(clean: Path, folder: Path):
    """A copy of a full cache whose every entry fails its checksum (last bit of its data
    flipped): each is rejected and written again. Returns the stale data files' bytes."""
    shutil.copytree(clean, folder)
    stale = {}
    for path in folder.glob("*.safetensors"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        stale[path.name] = bytes(data)
    return stale


def check_cache(folder: Path, spec, where: str, stale=None) -> None:
    """Only complete entries: every file an entry's; no temporary file (hidden or not); every
    .json loads through cache.py's own checks (checksums, then the group of its kind), but
    for a stale entry not yet rewritten (its data file as :func:`make_stale` left it)."""
    if not folder.exists():
        return
    names = sorted(p.name for p in folder.iterdir())
    stray = [n for n in names if not ENTRY.match(n)]
    assert not stray, f"{where}: stray files in the cache {stray}"
    store = cache.AlignmentCache(folder)
    for name in names:
        key = name.split(".", 1)[0]
        if name.endswith(".record.json"):
            assert store.load_record(key) is not None, f"{where}: {name} unreadable"
        elif name.endswith(".json"):
            data = folder / f"{key}.safetensors"
            if stale and data.exists() and stale.get(data.name) == data.read_bytes():
                continue  # stale from the start and still rejected: never applied
            what = json.loads((folder / name).read_text()).get("what")
            if what == "layer":
                loaded = cache.load_layer(store, key, spec)
            elif what == "residual":
                loaded = cache.load_residual(store, key)
            else:
                raise AssertionError(f"{where}: {name} is an entry of unexpected kind {what!r}")
            assert loaded is not None, f"{where}: {name} does not pass the cache's checks"


def test_interrupts_at_random_points_of_cached_merges(family, tmp_path, tripwire, caplog):
    from mergekit_symalign.statedict import spec_for_config

    spec = spec_for_config(family["config"])
    started = time.perf_counter()
    tripwire.arm(0)
    want = load(run_recipe(recipe(family, tmp_path / "clean-cache"), tmp_path / "clean"))
    total = tripwire.count  # hot calls of one merge with an empty cache: the most there are
    calls = tripwire.calls
    by_point = {}
    for n, where in enumerate(calls, start=1):
        by_point.setdefault(where, []).append(n)
    tripwire.arm(0)
    uncached = load(run_recipe(recipe(family), tmp_path / "uncached"))
    assert equal(want, uncached), "a merge with an empty cache differs from one without"
    assert total > 20, f"only {total} hot calls counted: the tripwire misses the merge"
    for point in ("solve.align_layer", "residual.solve", "AlignmentCache.load", "cache os.replace",
                  "cache os.fsync", "SaveTensor.execute", "TensorWriterTask.execute"):
        assert point in by_point, f"{point} is never called: {sorted(by_point)}"

    writes = [n for n, where in enumerate(calls, start=1) if where.startswith("cache os.")]
    others = sorted(p for p in by_point if not p.startswith("cache os."))

    def draw(rng):
        """N: half the time one of the cache's file operations (where an interrupted write
        could leave a half entry), else a point drawn uniformly, then one of its calls (so
        that a solve is hit as often as the loads of which there are many)."""
        if rng.random() < 0.5:
            return rng.choice(writes)
        return rng.choice(by_point[rng.choice(others)])

    rng = random.Random("interrupts")
    interrupted, completed, hits, round_no = 0, 0, {}, 0
    caches = []
    while interrupted < INTERRUPTED_TRIALS:
        # A round: trials on one cache folder, which fills up as interrupted merges leave
        # entries behind (so later trials interrupt merges that read a part of it).
        round_no += 1
        folder = tmp_path / f"cache{round_no}"
        # every third round rewrites stale entries (removing the old .json first)
        stale = make_stale(tmp_path / "clean-cache", folder) if round_no % 3 == 0 else None
        caches.append((folder, stale))
        for trial in range(4):
            where = f"round {round_no}, trial {trial}"
            out = tmp_path / f"out{round_no}-{trial}"
            tripwire.arm(draw(rng))
            try:
                run_recipe(recipe(family, folder), out)
            except KeyboardInterrupt:
                interrupted += 1
                hits[tripwire.hit] = hits.get(tripwire.hit, 0) + 1
                assert not out.exists(), (
                    f"{where}: interrupted at {tripwire.hit} (call {tripwire.at} of {total}), "
                    f"the output folder is left: {sorted(p.name for p in out.iterdir())}")
            else:  # the merge read enough from the cache to finish before call N
                completed += 1
                assert equal(load(str(out)), want), f"{where}: a completed merge differs"
                shutil.rmtree(out)
            hit = tripwire.hit
            tripwire.arm(0)
            check_cache(folder, spec, f"{where} (interrupted at {hit})", stale)

    # one trial into a folder that existed before: it is kept, with what it held
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    tripwire.arm(total // 2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(family, tmp_path / "cache-existing"), existing)
    assert (existing / "keep.txt").read_text() == "mine", "a folder that existed is changed"
    tripwire.arm(0)
    check_cache(tmp_path / "cache-existing", spec, "the trial into an existing folder")

    # the next merge with every cache the trials left: exact, and no entry is rejected but a
    # stale one that no trial rewrote
    tripwire.arm(0)
    for folder, stale in caches:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mergekit_symalign.cache"):
            got = load(run_recipe(recipe(family, folder), tmp_path / f"after-{folder.name}"))
        assert equal(got, want), f"the merge after the trials with {folder.name} is not exact"
        rejected = {m.group(1) + ".safetensors" for r in caplog.records
                    for m in [re.search(r"([0-9a-f]{64})\.json", r.getMessage())] if m}
        assert len(rejected) == len(caplog.records) and rejected <= set(stale or ()), (
            f"{folder.name}: an entry the trials wrote was rejected: {caplog.text}")
        check_cache(folder, spec, f"after the trials, {folder.name}")  # all rewritten now
    elapsed = time.perf_counter() - started
    print(f"\n{interrupted} interrupted trials ({completed} completed before the interrupt) "
          f"in {round_no} rounds ({round_no // 3} from stale caches) of {total} hot calls; "
          f"points hit: {hits}; {elapsed:.1f} s")
    assert interrupted >= INTERRUPTED_TRIALS, (interrupted, completed)


@pytest.mark.parametrize("point", ["config", "card"])
def test_an_interrupt_after_the_tensors_are_written(family, tmp_path, monkeypatch, point):
    """Ctrl-C after the executor finished, while run_merge writes config.json or the model
    card: without the run_merge hook the folder kept model.safetensors (and config.json when
    the card was being written: a folder that looks complete) though the merge failed."""
    import mergekit.merge
    import transformers

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt(point)

    if point == "config":
        monkeypatch.setattr(transformers.PretrainedConfig, "save_pretrained", interrupt)
    else:
        monkeypatch.setattr(mergekit.merge, "generate_card", interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(family, tmp_path / "cache"), out, write_model_card=True)
    assert not out.exists(), f"left behind: {sorted(p.name for p in out.iterdir())}"


def test_mergekit_yaml_binds_the_wrapped_run_merge():
    """``mergekit-yaml``'s module binds ``run_merge`` by name as ``mergekit.merge`` finishes
    importing: in a fresh interpreter (the .pth autoload only) it must hold the wrapper."""
    import subprocess
    import sys

    code = ("import mergekit.scripts.run_yaml as r, mergekit.merge as m; "
            "print(getattr(r.run_merge, '_symalign', False), r.run_merge is m.run_merge)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["True", "True"], proc.stdout + proc.stderr
