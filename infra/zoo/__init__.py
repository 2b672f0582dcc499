"""The model zoo: checkpoints and text that ship with expertbits, named by `zoo://` URIs.

`zoo://mixtral-tiny/wordnet` is a checkpoint folder under `models/<family>/<variant>/`;
`zoo://text/austen-heldout` is a corpus split under `corpora/` (or a small text under `text/`).
Nothing here is downloaded: the hub is not reachable everywhere expertbits runs, so the
project brings its own models.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent
# a bundled name: lowercase words, no path syntax (`..`, `/` beyond the one separator, `~`, ...)
_PART = r"[a-z0-9][a-z0-9_-]*"


def _checked(name: str, parts: int, kind: str) -> str:
    if not re.fullmatch("/".join([_PART] * parts), name):
        raise FileNotFoundError(f"{name!r} is not a bundled {kind} name (lowercase letters, digits, '-' and '_'"
                                f"{', family/variant' if parts == 2 else ''}); available: "
                                f"{available_models() if parts == 2 else available_texts()}")
    return name


def text_path(name: str) -> Path:
    path = ROOT / "text" / f"{_checked(name, 1, 'text')}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled text {name!r}; available: {available_texts()}")
    return path


def available_texts() -> list[str]:
    from .corpora import CORPORA

    splits = [f"{name}-{split}" for name, parts in CORPORA.items() for split in parts]
    return sorted([p.stem for p in (ROOT / "text").glob("*.txt")] + splits)


def read_text(uri: str) -> str:
    """The text named by `zoo://text/<name>`: a committed .txt, or `<corpus>-<split>` of the corpora."""
    from . import corpora

    name = _checked(uri.removeprefix("zoo://").removeprefix("text/").rstrip("/"), 1, "text")
    small = ROOT / "text" / f"{name}.txt"
    if small.is_file():
        return small.read_text()
    corpus, _, split = name.rpartition("-")
    if corpus in corpora.CORPORA and split in corpora.CORPORA[corpus]:
        return corpora.read(corpus, split)
    raise FileNotFoundError(f"no bundled text {name!r}; available: {available_texts()}")


def available_models() -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in (ROOT / "models").glob("*/*") if (p / "config.json").is_file())


def resolve(uri: str) -> Path:
    """Local folder of a `zoo://family/variant` checkpoint."""
    name = _checked(uri.removeprefix("zoo://").rstrip("/"), 2, "model")
    path = ROOT / "models" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no zoo model {name!r}; available: {available_models()}")
    return path
