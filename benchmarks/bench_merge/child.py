"""The timed child: every merge runs ``mergekit-yaml`` in its own process, which reports its
wall time and peak memory; and the model card's distance after alignment."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

from examples.common import run_mergekit_yaml

# The timed child: mergekit-yaml in-process, its wall time (imports included), peak RSS, and
# peak *anonymous* memory, sampled every 5 ms from /proc/self/status (Linux; 0 elsewhere).
# Peak RSS also counts the pages of the memory-mapped input files that the process touched,
# which the page cache moves by +-100 MiB (SmolLM2) to +-1 GiB (1B) from run to run; the
# anonymous memory is what the merge itself allocated (tensors, temporaries).
CHILD = """
import resource, sys, threading, time
sys.argv = ["mergekit-yaml"] + sys.argv[1:]

def status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

def anon_kib():
    return status_kib("RssAnon:")

def peak_rss_kib():
    # VmHWM: this process image's own peak. ru_maxrss keeps the parent's peak across
    # fork + exec, so it read the benchmark's own size (e.g. 18.9 GiB for every 1B merge,
    # whose models the benchmark had just built) whenever that was the larger.
    return status_kib("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def gpu_peak_kib():
    # the CUDA caching allocator's peak (--cuda); 0 where the merge never used CUDA
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() // 1024
    except Exception:
        pass
    return 0

peak, done = [anon_kib()], threading.Event()

def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], anon_kib())

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
from mergekit.scripts.run_yaml import main
try:
    main(standalone_mode=False)
finally:
    done.set()
    print("BENCH", time.perf_counter() - t, peak_rss_kib(), max(peak[0], anon_kib()),
          gpu_peak_kib(), file=sys.stderr)
"""


class MergeRun(NamedTuple):
    seconds: float
    rss_mib: float
    anon_mib: float
    gpu_mib: float
    distance_after: Optional[float]  # the model card's median over layers; None for plain


def card_distance_after(card: Path) -> Optional[float]:
    """The median distance to the reference after alignment, from the model card's "What
    alignment did" table (the first aligned model's row), or None where there is none."""
    if not card.is_file():
        return None
    match = re.search(r"\| \S+ → (\S+) \|$", card.read_text(), re.MULTILINE)
    return float(match.group(1)) if match else None


def run_one(recipe, workdir: Path, extra) -> MergeRun:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = run_mergekit_yaml(recipe, Path(tmp) / "recipe.yml", Path(tmp) / "out",
                                "--no-copy-tokenizer", *extra,
                                command=[sys.executable, "-c", CHILD])
        line = [l for l in run.stderr.splitlines() if l.startswith("BENCH ")][-1]
        _, seconds, maxrss_kb, anon_kb, gpu_kb = line.split()
        return MergeRun(float(seconds), int(maxrss_kb) / 1024, int(anon_kb) / 1024,
                        int(gpu_kb) / 1024, card_distance_after(Path(tmp) / "out" / "README.md"))
