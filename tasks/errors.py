"""The errors expertbits raises for bad input: each names what is wrong and how to fix it.

They subclass ValueError (not OSError) on purpose: Prefect retries I/O errors, and a bad
checkpoint or an impossible budget must fail at once instead of being retried.

A message names a checkpoint the way the user named it. Stages read checkpoints from the
content-addressed cache (`<cache>/checkpoints/<sha256>/`), so whatever raised the error may only
know that folder; `remember_source` records which URI each cache folder holds (checkpoints/fetch.py does,
whenever it hands out a folder) and the error replaces the folder with that URI, keeping the
folder as a detail after the fix.
"""

from __future__ import annotations

import re

_SOURCES: dict[str, tuple[str, bool]] = {}  # local folder -> (the URI the user gave, a cache copy of it)


def remember_source(path, uri: str, cached: bool = True) -> None:
    """Name the local folder `path` as `uri` in error messages raised in this process (a cache
    copy is still shown as a detail; the user's own folder, resolved, is just named as given)."""
    if str(path) != uri:
        _SOURCES[str(path)] = (uri, cached)


def in_user_words(text: str) -> tuple[str, list[str]]:
    """`text` with every known folder replaced by its URI, and the cache folders replaced."""
    replaced = []
    for path in sorted(_SOURCES, key=len, reverse=True):  # a longer folder first: never a prefix of it
        uri, cached = _SOURCES[path]
        # the whole folder name only: not the start of /models/qwen2, nor the end of /mnt/models/qwen
        text, n = re.subn(r"(?<![\w./-])" + re.escape(path) + r"(?![\w.-])", lambda _: uri, text)
        if n and cached:
            replaced.append(path)
    return text, replaced


class ExpertbitsError(ValueError):
    """Bad input. `fix` tells the user what to do about it."""

    def __init__(self, problem: str, fix: str, option: str | None = None, cached: tuple[str, ...] = ()):
        self.problem, folders = in_user_words(problem)
        self.fix = fix
        self.option = option  # the flow parameter at fault, when one is (the CLI names its option)
        self.cached = (*cached, *folders)  # the cache folders the problem was found in: a detail
        detail = "".join(f"\n  cached copy: {folder}" for folder in self.cached)
        super().__init__(f"{self.problem}\n  fix: {fix}{detail}")

    def __reduce__(self):  # whole across processes (a Dask worker's error reaches the CLI as it was)
        return type(self), (self.problem, self.fix, self.option, self.cached)


class CheckpointError(ExpertbitsError):
    """A checkpoint is unreadable, truncated, not MoE, or not what the run expects."""


class BudgetError(ExpertbitsError):
    """The requested bit budget cannot be met with the available bit-widths."""


class StoreError(ExpertbitsError):
    """The artifact store cannot be reached or written."""


class ValidationFailed(ExpertbitsError):
    """A kernel or a quantized tensor disagrees with its reference."""
