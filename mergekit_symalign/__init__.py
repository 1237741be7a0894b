"""mergekit-symalign: merge after aligning models along the exact symmetries of the transformer.

Importing the package registers the ``symmetry_aligned_*`` methods with mergekit (when
mergekit is installed). The pure mathematics lives in :mod:`.groups`, :mod:`.spec`,
:mod:`.architectures` and :mod:`.statedict` and imports no mergekit module.
"""

__version__ = "0.1.0"

try:
    import mergekit  # noqa: F401
except ImportError:  # the pure-math modules still work without mergekit
    pass
else:
    from .plugin import install as _install

    _install()
