"""Independently initialised models (issue 10): linear-path fusion and cross-init skill transfer.

    .venv/bin/python -m benchmarks.independent_init [--seeds 3] [--widths 128 256] [--quick]

Per width and seed it trains (``paper_analog.build_family``'s recipes, cached under
``--workdir``) two bases from different random initialisations on the same data mixture
(different draws of it); at the transfer widths (``--transfer-widths``, default 128: exactly
the paper analog's family) also the rest of the family: reference and skill from the first
base, targets from both.

* **Fusion**: the loss along the straight line ``(1 - a) A + a B'`` between base A and base
  B aligned to A (``B' = g . B`` for an exact symmetry ``g``: same function as B), on
  held-out pre-training text, for plain (``B' = B``) and each alignment variant; the
  *barrier* is the path's largest excess over the straight line between the endpoints'
  losses. Variants: the layer groups without and with attention-head permutations, the
  residual stream as a signed permutation or a rotation (after folding the norms), by
  weights or by activations, and *iterative weight matching* (implemented here, on the
  package's public pieces): coordinate descent between the residual transform (re-solved
  from every layer's reader columns and writer rows, in the layer-aligned coordinates, plus
  the embeddings) and the layer groups.
* **Transfer**: ``tau = skill - reference`` (init A) put into the target of init B (its own
  instruction-tuned model) with mergekit's plain ``task_arithmetic`` and with
  ``symmetry_aligned_task_arithmetic`` (``residual: permutation / orthogonal``, weights and
  activations), against the same-base transfer (the paper analog's setting) on the same
  seeds; the iterative alignment's transfer is built on state dicts (same formula).

Modules: ``states`` (state-dict helpers), ``matching`` (iterative weight matching, the
algorithm), ``variants`` (what is compared), ``fusion`` and ``transfer`` (the two
measurements), ``tables`` and ``plots`` (docs/independent-init.md), ``run`` (the command line).
"""
