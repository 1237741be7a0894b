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
    """A NaN/Inf weight in an input model."""


class IncompatibleMergekit(SymAlignError, RuntimeError):
    """The installed mergekit moved an internal the planner hook relies on."""
