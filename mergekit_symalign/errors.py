"""Every error the plugin raises on purpose (no mergekit import).

Each message names the model, the tensor or parameter, and the remedy.
"""

from __future__ import annotations


class SymAlignError(ValueError):
    """Base class: something the plugin refuses rather than silently altering a model."""


class SymAlignConfigError(SymAlignError):
    """A recipe (or option) the plugin refuses, with the reason and the remedy."""


class UnsupportedArchitecture(SymAlignError):
    """An architecture (or variant) whose symmetries are not proven exact here."""


class NonFiniteTensorError(SymAlignError):
    """A NaN/Inf weight in an input model (found as the tensor is loaded)."""


class UndeterminedAlignment(SymAlignError):
    """Calibration activations that do not determine a layer's transform (``alignment:
    activations``): degenerate or too uniform text, so the solvers would pick an arbitrary
    element and the merge would be silently wrong."""


class IncompatibleMergekit(SymAlignError, RuntimeError):
    """The installed mergekit moved an internal the planner hook relies on."""
