"""Real natural-text corpora that ship with expertbits, xz-compressed under `corpora/`.

    from expertbits.zoo import corpora
    text = corpora.read("austen", "train")           # str
    pairs = corpora.supersense_examples("test")     # [(gloss, label), ...]

The files are derived from Debian packages and CPython by `python -m expertbits.zoo.build_corpora`
(see that module for how each one is made, and `corpora/NOTICE` for the licences). Which file
holds what, with sizes and source versions, is in `corpora/manifest.json`.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from pathlib import Path

ROOT = Path(__file__).parent / "corpora"
MANIFEST = ROOT / "MANIFEST.sha256"

# name -> splits. Held-out parts are never mixed into train, so they measure generalisation.
CORPORA: dict[str, tuple[str, ...]] = {
    "austen": ("train", "heldout"),             # 5 novels / Persuasion
    "web": ("train", "heldout"),                # World English Bible (derived), every 12th book held out
    "wordnet-supersense": ("train", "test"),    # "<gloss> => <label>" lines, 8 balanced labels
    "wordnet-glosses": ("train",),              # plain glosses, none from the supersense test set
    "python": ("train", "heldout"),             # CPython stdlib source, every 20th file held out
}

SUPERSENSE_LABELS: tuple[str, ...] = ("animal", "artifact", "body", "food", "location", "person", "plant", "substance")
SEPARATOR = " => "


def filename(name: str, split: str) -> str:
    """File name of one corpus split, checking both against `CORPORA`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {sorted(CORPORA)}")
    if split not in CORPORA[name]:
        raise ValueError(f"corpus {name!r} has no split {split!r}; it has {list(CORPORA[name])}")
    return f"{name}-{split}.txt.xz"


def path(name: str, split: str) -> Path:
    """Path of the committed .xz file of `name`/`split`."""
    file = ROOT / filename(name, split)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing; rebuild with `python -m expertbits.zoo.build_corpora`")
    return file


@functools.lru_cache(maxsize=16)  # corpora are read many times per test session; str is immutable
def read(name: str, split: str) -> str:
    """The whole text of `name`/`split`, decompressed and decoded as UTF-8."""
    return lzma.decompress(path(name, split).read_bytes()).decode("utf-8")


def verify() -> list[str]:
    """File names whose sha256 disagrees with MANIFEST.sha256 (or that are missing); empty if all good."""
    bad = []
    for line in MANIFEST.read_text().splitlines():
        digest, _, name = line.partition("  ")
        file = ROOT / name
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def supersense_examples(split: str) -> list[tuple[str, str]]:
    """(gloss, label) pairs of the WordNet noun-supersense task; labels are from SUPERSENSE_LABELS."""
    pairs = []
    for line in read("wordnet-supersense", split).splitlines():
        gloss, sep, label = line.rpartition(SEPARATOR)
        if not sep or label not in SUPERSENSE_LABELS:
            raise ValueError(f"bad supersense line: {line!r}")
        pairs.append((gloss, label))
    return pairs
