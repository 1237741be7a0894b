"""The merge's output folder: removed again when an aligned merge fails after mergekit's
writer created it (no mergekit import; :mod:`.plugin` hooks it around the executor)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Iterator

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputFolder:
    """The merge's output folder, and whether it existed before the merge was planned."""

    path: str
    existed: bool

    @classmethod
    def before_merge(cls, out_path: str) -> "OutputFolder":
        path = os.path.abspath(out_path)
        return cls(path=path, existed=os.path.lexists(path))

    def remove_if_created(self) -> None:
        """Remove the folder if this merge created it (never one that existed before)."""
        if not self.existed and os.path.isdir(self.path) and not os.path.islink(self.path):
            LOG.warning("merge failed: removing the output folder %s that it created", self.path)
            shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def removed_on_failure(self) -> Iterator[None]:
        """Any exception, KeyboardInterrupt and GeneratorExit included (the merge did not
        finish), removes the folder if this merge created it, then propagates."""
        try:
            yield
        except BaseException:
            self.remove_if_created()
            raise
