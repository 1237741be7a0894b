"""mergekit-symalign: merge after aligning models along the exact symmetries of the transformer.

Importing the package registers the ``symmetry_aligned_*`` methods with mergekit (when
mergekit is installed; a ``.pth`` hook also does it as soon as ``mergekit.plan`` is
imported). The pure mathematics (:mod:`.groups`, :mod:`.spec`, :mod:`.architectures`,
:mod:`.statedict`, :mod:`.activations`, :mod:`.solve`, :mod:`.kernels`) imports no mergekit
module; the mergekit glue is :mod:`.plugin`, :mod:`.planner` (with :mod:`.layout`,
:mod:`.alignments`, :mod:`.tensor_inputs`), :mod:`.tasks`, :mod:`.methods` and
:mod:`.validation`. The module map: ``docs/architecture.md``.
"""

__version__ = "0.1.0"

try:
    import mergekit  # noqa: F401
except ImportError:  # the pure-math modules still work without mergekit
    pass
else:
    import warnings as _warnings

    from .errors import IncompatibleMergekit as _Incompatible
    from .plugin import install as _install

    try:
        _install()
    except _Incompatible as _err:  # plain mergekit and the pure math keep working
        _warnings.warn(str(_err), stacklevel=2)
