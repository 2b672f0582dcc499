"""Extract the micro-mixtral corpora from CPython itself (PSF licence; see text/NOTICE).

docs-*: the language reference topics (`pydoc_data.topics`), every 5th topic held out.
code-*: a fixed list of pure-Python standard-library modules, the last three held out.
The committed files are the source of truth; rerun only to rebuild them on purpose.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

OUT = Path(__file__).parent / "text"
CODE_TRAIN = ["argparse", "textwrap", "string", "difflib", "fractions", "heapq", "bisect", "shlex", "calendar", "glob"]
CODE_HELDOUT = ["fnmatch", "colorsys", "graphlib"]


def main() -> None:
    from pydoc_data.topics import topics

    names = sorted(topics)
    docs = {"train": [], "heldout": []}
    for i, name in enumerate(names):
        docs["heldout" if i % 5 == 4 else "train"].append(topics[name].strip())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    OUT.mkdir(exist_ok=True)
    for split, parts in docs.items():
        (OUT / f"docs-{split}.txt").write_text("\n\n".join(parts) + "\n")
    for split, modules in (("train", CODE_TRAIN), ("heldout", CODE_HELDOUT)):
        (OUT / f"code-{split}.txt").write_text("\n\n".join((stdlib / f"{m}.py").read_text() for m in modules))


if __name__ == "__main__":
    main()
