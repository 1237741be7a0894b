"""Wall time and peak memory: mergekit's plain task_arithmetic vs the aligned method, same run.

    .venv/bin/python -m benchmarks.bench_merge [--suites smollm2 8b-layer 1b] [--repeats 3]
    .venv/bin/python -m benchmarks.bench_merge --layer-only   # one Llama-3.1-8B-shaped layer
    python3 -m benchmarks.bench_merge --cuda --suites smollm2-random --rows activations \
        --smollm2-dir DIR --no-docs   # plain and the named rows only, printed
    .venv/bin/python -m benchmarks.bench_merge --suites smollm2 --calibration-samples 36 20 14
        # alignment: activations against its calibration budget

Every merge runs `mergekit-yaml` in its own process (peak RSS = that process's VmHWM;
peak anonymous memory = the largest RssAnon of /proc/self/status sampled every 5 ms, i.e.
without the memory-mapped input files' pages, see CHILD; with --cuda also the CUDA caching
allocator's peak, torch.cuda.max_memory_allocated); runs alternate between the methods so that they share the machine's noise; each figure is
the median over the repeats, with the range, and each row's time is also divided run by run
by the plain run of the same round (the median and range of those ratios), which cancels the
machine's slow and fast spells. Suites:

* ``smollm2``: the real SmolLM2-135M-Instruct (reference), a perturbed copy (skill) and a
  perturbed copy under a random exact symmetry of its layers (target): plain, aligned by
  weights, the same onto the perturbed copy not moved (sibling: the alignment finds the
  identity, as on descendants of one base), + ``residual: permutation``, by activations,
  and a second merge with other weights reusing a saved alignment (``alignment_cache``,
  filled by one untimed run first).
* ``8b-layer``: a one-layer model with Llama-3.1-8B's layer shapes (hidden 4096, 32/8 heads,
  MLP 14336, vocabulary 512), random bfloat16 weights, target = a perturbed sibling under a
  random exact symmetry (neurons, heads, V/O, Q/K planes and scales).
* ``1b``: a synthetic Llama-3.2-1B-shaped model (hidden 2048, 16 layers, MLP 8192, 32/8
  heads, vocabulary 2048), bfloat16, built the same way.
* ``smollm2-random``: the ``smollm2`` suite's models and rows with SmolLM2-135M-Instruct's
  config and tokenizer but random float32 weights, built the same way, for a machine without
  the GGUF (the GPU machine: the package is larger than what travels there); the config and
  tokenizer come from ``--smollm2-dir`` (default: the float32 SmolLM2 folder that
  examples/smollm.py caches). Its costs are the real model's except where the matchers'
  work depends on the values (how many neurons they must score exactly).

Synthetic models are generated here, never downloaded. `--layer-only` times the alignment of
one 8B-shaped layer per symmetry through `spec.align_layer` (median of --repeats; float32 and
bfloat16 weights), in-process, on CPU (on CUDA with --cuda).

Results go to docs/performance.md unless --no-docs: region ``merge_cost_<suite>`` (with a bar
chart), ``layer_8b_cpu`` / ``layer_8b_cuda`` for --layer-only; ``_cuda`` suffix with --cuda,
``_mmap`` with --mmap-threshold (memory figures without the allocator's retention),
``_calibration`` with --calibration-samples (plain, weights, and activations at the default
calibration budget and at N prompts each, with the model card's distance after alignment).

Modules: ``models`` (the suites' models, built here), ``child`` (the timed mergekit-yaml
process), ``merge`` (a suite's rows, runs and summary), ``layer`` (``--layer-only``),
``tables`` (the docs' tables and chart), ``run`` (the command line).
"""
