"""The command line: train or reuse each width's and seed's models, measure, cache the
results per seed, and write docs/independent-init.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from benchmarks import docs_pages
from benchmarks import paper_analog as pa
from benchmarks import toyworld as tw
from benchmarks.independent_init import __doc__ as OVERVIEW
from benchmarks.independent_init.fusion import calibration_ids, eval_batches, fusion_pair, fusion_parts
from benchmarks.independent_init.matching import residual_fit
from benchmarks.independent_init.plots import plots
from benchmarks.independent_init.tables import render
from benchmarks.independent_init.transfer import transfer_seed
from benchmarks.independent_init.variants import BASES, FUSION, TRANSFER, TRANSFER_MODELS, config_for


RESULTS_VERSION = 1  # bump when a measurement changes: invalidates cached results


def parse_widths(items: Sequence[str], seeds: int) -> List[Tuple[int, int]]:
    """``128 256 512:2`` -> [(128, seeds), (256, seeds), (512, 2)]."""
    out = []
    for item in items:
        width, _, n = str(item).partition(":")
        out.append((int(width), int(n) if n else seeds))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=OVERVIEW.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--widths", nargs="+", default=["128", "256"],
                    help="hidden widths of the fusion sweep; WIDTH:N runs N seeds at that width")
    ap.add_argument("--transfer-widths", nargs="*", type=int, default=[128],
                    help="widths at which the whole family is trained and the transfer measured")
    ap.add_argument("--points", type=int, default=21, help="points on the linear path")
    ap.add_argument("--eval-examples", type=int, default=128,
                    help="held-out pre-training examples the path's loss is measured on")
    ap.add_argument("--calibration", type=int, default=600,
                    help="calibration lines for activation matching and the correlations")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems per task")
    ap.add_argument("--workdir", default="bench-output/independent-init")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: widths 32 and 48, 1 seed, tiny schedules, few points")
    ap.add_argument("--no-docs", action="store_true", help="print only; don't rewrite docs/")
    ap.add_argument("--from-results", action="store_true",
                    help="don't train or measure: report the workdir's saved results.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    scale = 1.0
    if args.quick:  # smaller defaults; what is given explicitly stays
        scale = 0.02
        quick = {"points": 5, "eval_examples": 32, "problems": 5, "calibration": 200,
                 "widths": ["32", "48"], "transfer_widths": [32], "seeds": 1}
        for key, value in quick.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    widths = parse_widths(args.widths, args.seeds)
    workdir = Path(args.workdir).resolve()
    world = tw.World()
    problems = {t: tw.held_out(t, args.problems) for t in tw.TASKS}
    exclude = {p for exs in problems.values() for p, _ in exs}
    alphas = [i / (args.points - 1) for i in range(args.points)]
    start = time.perf_counter()
    if args.from_results:
        saved = json.loads((workdir / "results.json").read_text())
    else:
        batches = eval_batches(world, args.eval_examples, exclude)
        ids = calibration_ids(workdir, world, args.calibration)
        calibration = pa.write_calibration(workdir / "calibration-transfer.txt", world)
        pairs, transfer_rows, timings = [], [], {}
        fusion_key = {"version": RESULTS_VERSION, "points": args.points,
                      "eval_examples": args.eval_examples, "calibration": args.calibration,
                      "variants": list(FUSION), "scale": scale}
        transfer_key = {"version": RESULTS_VERSION, "problems": args.problems,
                        "variants": list(TRANSFER), "scale": scale}
        for width, seeds in widths:
            config = config_for(width)
            for seed in range(seeds):
                root = workdir / f"w{width}" / f"seed{seed}"
                family = TRANSFER_MODELS if width in args.transfer_widths else BASES
                t = time.perf_counter()
                paths = pa.build_family(root, seed, scale, world, exclude, config=config,
                                        models=family)
                trained = time.perf_counter() - t
                if trained > 5:  # something was trained (not just reused): keep its time
                    log = root / "train_s.json"
                    before = json.loads(log.read_text()) if log.is_file() else 0.0
                    log.write_text(json.dumps(before + trained))
                timings[f"w{width}-seed{seed}-train"] = (
                    json.loads((root / "train_s.json").read_text())
                    if (root / "train_s.json").is_file() else None)
                pair = cached_result(root / "fusion.json", fusion_key)
                if pair is None:
                    print(f"width {width} seed {seed}: fusion of base and base-other-init",
                          flush=True)
                    t = time.perf_counter()
                    pair = {"width": width, "seed": seed,
                            "variants": fusion_pair(paths, config, ids, batches, alphas, FUSION),
                            "wall_s": time.perf_counter() - t}
                    store_result(root / "fusion.json", fusion_key, pair)
                if "residual_fit" not in pair:  # cheap: embedding rows only
                    pair["residual_fit"] = residual_fit(paths, config)
                    store_result(root / "fusion.json", fusion_key, pair)
                if "parts" not in pair:
                    t = time.perf_counter()
                    pair["parts"] = fusion_parts(paths, config, ids, batches)
                    pair["wall_s"] += time.perf_counter() - t
                    store_result(root / "fusion.json", fusion_key, pair)
                pairs.append(pair)
                timings[f"w{width}-seed{seed}-fusion"] = pair["wall_s"]
                if width in args.transfer_widths:
                    rows = cached_result(root / "transfer.json", transfer_key)
                    if rows is None:
                        t = time.perf_counter()
                        rows = [{"width": width, **row} for row in transfer_seed(
                            root, paths, config, problems, calibration, TRANSFER, seed)]
                        rows[0]["wall_s"] = time.perf_counter() - t
                        store_result(root / "transfer.json", transfer_key, rows)
                    transfer_rows += rows
                    timings[f"w{width}-seed{seed}-transfer"] = rows[0]["wall_s"]
        saved = {"pairs": pairs, "transfer": transfer_rows, "alphas": alphas,
                 "wall_s": time.perf_counter() - start, "timings": timings,
                 "args": vars(args), "date": datetime.date.today().isoformat(),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                            f"torch {torch.__version__}, {args.threads} thread(s)"}
        (workdir / "results.json").write_text(json.dumps(saved, indent=1))
    text = render(saved)
    print(text)
    if not args.no_docs:
        images = plots(saved)
        docs_pages.update_page("independent-init.md", "independent_init",
                           text + "\n\n" + "\n\n".join(images))
        print("wrote docs/independent-init.md and its", len(images), "plots under docs/img/")
    return 0


def cached_result(path: Path, key: Dict):
    """A result saved by an earlier run with the same settings (None otherwise)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["result"] if saved.get("key") == key else None


def store_result(path: Path, key: Dict, result) -> None:
    path.write_text(json.dumps({"key": key, "result": result}, indent=1))
