"""Wall time and peak memory: mergekit's plain task_arithmetic vs the aligned method, same run.

The command line of ``python -m benchmarks.bench_merge`` (see the package's docstring)."""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_merge.layer import layer_benchmark
from benchmarks.bench_merge.merge import merge_benchmark
from benchmarks.bench_merge.models import SUITES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench-output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES[:3]))
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--layer-only", action="store_true")
    parser.add_argument("--mmap-threshold", type=int, metavar="BYTES",
                        help="run every merge with glibc's MALLOC_MMAP_THRESHOLD_=BYTES, so that "
                             "freed tensors above it leave the process at once and the peak "
                             "anonymous memory measures live memory, not what the allocator "
                             "keeps (it moves by +-150 MiB from run to run on SmolLM2 by "
                             "default); region merge_cost_<suite>_mmap")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not write docs/")
    parser.add_argument("--rows", nargs="+", metavar="WORD",
                        help="only the rows whose name contains one of these words (and plain); "
                             "printed, not written to docs/")
    parser.add_argument("--calibration-samples", nargs="+", type=int, metavar="N",
                        help="smollm2 suites: time alignment: activations with the default "
                             "calibration budget and with each N prompts of the shipped set "
                             "(plain and weights beside them), with the model card's distance "
                             "after alignment; region merge_cost_<suite>_calibration")
    parser.add_argument("--smollm2-dir", metavar="DIR",
                        help="smollm2-random: a folder with SmolLM2's config.json and tokenizer "
                             "(default: the SmolLM2 folder cached by examples/smollm.py)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: torch sees no CUDA GPU on this machine; run without --cuda for "
                     "the CPU figures")
    if args.calibration_samples and (args.layer_only or not all(
            s.startswith("smollm2") for s in args.suites)):
        parser.error("--calibration-samples: only the smollm2 suites align by activations")
    if args.layer_only:
        layer_benchmark(args)
    else:
        for suite in args.suites:
            merge_benchmark(args, suite)
