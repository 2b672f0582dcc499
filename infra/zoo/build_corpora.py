"""Rebuild the committed corpora in `corpora/` from three Debian packages and CPython's stdlib.

    python -m expertbits.zoo.build_corpora [--debs DIR] [--out DIR]

Each package is taken from --debs when a `PKG_*.deb` is there, else fetched with `apt-get
download` (no root needed) and unpacked with `dpkg-deb -x`. Then:

- austen: r-cran-janeaustenr keeps the six novels as R character vectors (one element per line)
  in a lazy-load database; `RReader` reads R's XDR serialisation, so no R is needed.
  Held out: Persuasion.
- web: sword-text-web is a SWORD zText module of the World English Bible in OSIS markup. Verse
  text is read through the verse index, kept only inside chapters (this drops the preface,
  book introductions and the glossary), stripped of markup, one verse per line, one blank line
  between books. Held out: every 12th book.
- wordnet: wordnet-base's data.* files give each synset's lexicographer file (its supersense) and
  gloss. The task is noun supersense from gloss over 8 labels, 1,750 train + 250 test each; the
  plain gloss text (at most ~2 M chars) never contains a test gloss.
- python: the *.py files of the running CPython's stdlib, tests excluded, sorted by path, each
  preceded by a `# file: PATH` line; every 20th file held out, train capped at ~3 M chars.

Sampling is by sha256 order, never by `random`, and xz output has no timestamps, so the same
inputs (and liblzma) give byte-identical files. The run writes MANIFEST.sha256, manifest.json
and NOTICE next to the .xz files.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import lzma
import re
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

from .corpora import ROOT, SEPARATOR, SUPERSENSE_LABELS, filename

PACKAGES = {"austen": "r-cran-janeaustenr", "web": "sword-text-web", "wordnet": "wordnet-base"}
XZ_PRESET = 9  # 64 MiB dictionary: decompression needs ~65 MiB, fine everywhere we run


def sha_key(text: str) -> str:
    """Deterministic, version-independent shuffle key."""
    return hashlib.sha256(text.encode()).hexdigest()


# --- Debian packages -------------------------------------------------------------------------

def unpack(pkg: str, debs: Path | None, work: Path) -> tuple[Path, str]:
    """Unpack Debian package `pkg` under `work`; returns (root folder, Debian version)."""
    found = sorted(debs.glob(f"{pkg}_*.deb")) if debs else []
    if len(found) > 1:
        raise SystemExit(f"several {pkg} .deb files in {debs}; keep one: {[f.name for f in found]}")
    if not found:
        done = subprocess.run(["apt-get", "download", pkg], cwd=work, capture_output=True, text=True)
        found = sorted(work.glob(f"{pkg}_*.deb"))
        if done.returncode or not found:
            raise SystemExit(f"apt-get download {pkg} failed:\n{done.stderr}")
    deb = found[0]
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], capture_output=True, text=True, check=True)
    root = work / pkg
    subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    return root, version.stdout.strip()


def dep5_license(copyright_file: Path, name: str) -> str:
    """Body of the first `License: name` stanza that has text, from a Debian copyright file."""
    for match in re.finditer(rf"^License: {re.escape(name)}\n((?:[ \t].*\n?)+)", copyright_file.read_text(), re.M):
        lines = [line.strip() for line in match.group(1).splitlines()]
        return "\n".join("" if line == "." else line for line in lines).strip()
    raise ValueError(f"no text for licence {name!r} in {copyright_file}")


# --- R serialisation (XDR, versions 2 and 3) -------------------------------------------------

class RVector(list):
    """An R vector (atomic or list) as a Python list, with its R attributes in `.attrs`."""

    def __init__(self, items=(), attrs: dict | None = None):
        super().__init__(items)
        self.attrs = attrs or {}

    def named(self) -> dict:
        """The elements keyed by the `names` attribute."""
        return dict(zip(self.attrs["names"], self))


class RReader:
    """Reads one XDR-serialised R object: enough for character/numeric vectors, lists, data
    frames, pairlists and attributes, which is what packaged datasets are made of."""

    NIL, REF, ALTREP = 254, 255, 238
    SPECIAL = {253, 252, 251, 250, 242, 241}  # global/base/empty env, unbound, missing: no payload
    PAIRLISTS = {2, 6}                         # LISTSXP, LANGSXP
    NUMBERS = {10: "i", 13: "i", 14: "d"}      # logical, integer, double (R's NA is kept as-is)
    LISTS = {19, 20}                           # VECSXP, EXPRSXP

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialisation")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        if version not in (2, 3):
            raise ValueError(f"R serialisation version {version} is not supported")
        self.pos += 8                  # writer and minimal reader R versions
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()

    def read(self):
        """The next object: str for a CHARSXP, dict for a pairlist, RVector for vectors, None for NULL."""
        flags = self.int()
        kind = flags & 0xFF
        if kind == self.NIL or kind in self.SPECIAL:
            return None
        if kind == self.REF:
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # SYMSXP: later uses refer back to it by position
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == 9:  # CHARSXP; the LATIN1 bit is 4 in the level bits above bit 12
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags >> 12 & 4 else "utf-8")
        if kind in self.PAIRLISTS:
            return self.pairlist(flags)
        if kind == self.ALTREP:
            return self.altrep()
        if kind == 16 or kind in self.LISTS:
            value = RVector(self.read() for _ in range(self.length()))
        elif kind in self.NUMBERS:
            n = self.length()
            value = RVector(struct.unpack_from(f">{n}{self.NUMBERS[kind]}", self.data, self.pos))
            self.pos += n * struct.calcsize(self.NUMBERS[kind])
        else:
            raise ValueError(f"R SEXP type {kind} is not supported by this reader")
        value.attrs = self.read() if flags & 1 << 9 else {}  # a pairlist: {"names": ..., "class": ...}
        return value

    def pairlist(self, flags: int) -> dict:
        """A pairlist (e.g. attributes) as {tag: value}; untagged cells are keyed by position."""
        cells = {}
        while True:
            if flags & 1 << 9:
                self.read()  # attributes of the cell itself: never used by data
            tag = self.read() if flags & 1 << 10 else str(len(cells))
            cells[tag] = self.read()
            flags = self.int()
            if flags & 0xFF == self.NIL:
                return cells
            if flags & 0xFF not in self.PAIRLISTS:
                raise ValueError("dotted pairlists are not supported")

    def altrep(self):
        """Compact ALTREP forms R >= 3.5 may write for plain vectors."""
        info, state, attrs = self.read(), self.read(), self.read()
        cls = list(info.values())[0]
        if cls == "compact_intseq":
            n, start, step = (int(x) for x in state)
            value = RVector(range(start, start + n * step, step))
        elif cls.startswith("wrap_"):
            value = RVector(state[0])
        else:
            raise ValueError(f"ALTREP class {cls} is not supported")
        value.attrs = attrs or {}
        return value


def read_lazyload_db(rdb: Path, rdx: Path) -> dict:
    """All objects of an R lazy-load database (`.rdb` blobs indexed by the gzipped `.rdx`)."""
    index = RReader(gzip.decompress(rdx.read_bytes())).read().named()
    compressed = index["compressed"][0]
    data, objects = rdb.read_bytes(), {}
    for name, (offset, size) in index["variables"].named().items():
        blob = data[offset + 4:offset + size]  # 4 bytes: big-endian uncompressed length
        if compressed in (2, 3):  # a type byte follows: Z(lib), 2 (bzip2), X(z), 0 (stored)
            kind, blob = blob[:1], blob[1:]
        else:
            kind = b"Z" if compressed else b"0"
        raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](blob)
        objects[name] = RReader(raw).read()
    return objects


# --- the corpora ------------------------------------------------------------------------------

AUSTEN = {"sensesensibility": "Sense & Sensibility", "prideprejudice": "Pride & Prejudice",
          "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion"}  # the order of janeaustenr::austen_books()


def austen(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Split -> [(novel, text)], one novel's lines joined as they are in the package."""
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    objects = read_lazyload_db(data / "Rdata.rdb", data / "Rdata.rdx")
    novels = [(title, "\n".join(line or "" for line in objects[key]).strip() + "\n") for key, title in AUSTEN.items()]
    return {"train": novels[:-1], "heldout": novels[-1:]}


# Greek Daniel repeats Daniel 1-12. It lies outside the module's NRSVA versification, so osis2mod
# packed the whole book into one verse entry, whose 16-bit size field wrapped: the text is cut.
WEB_SKIP = {"DanGr"}
WEB_CHAPTER = re.compile(r'<chapter\b[^>]*\bsID="([^".]+)\.(\d+)"[^>]*/>(.*?)<chapter eID="\1\.\2"/>', re.S)


def osis_to_text(osis: str) -> str:
    """Plain text of an OSIS fragment: notes, non-canonical titles and speaker labels dropped."""
    osis = re.sub(r"\s*<note\b.*?</note>\s*", "\0", osis, flags=re.S)
    osis = re.sub(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>|<speaker\b.*?</speaker>', " ", osis, flags=re.S)
    osis = re.sub(r"</?(?:w|q|name|seg|hi|transChange|foreign|divineName)\b[^>]*>", "", osis)  # inline: no gap
    osis = re.sub(r"<[^>]*>", " ", osis)
    # A note often sits between two words with no space of its own, but also before punctuation.
    osis = re.sub(r"\0+(?=[\s,.;:!?’”)\]]|$)", "", osis).replace("\0", " ")
    return html.unescape(" ".join(osis.split()))


def web(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Split -> [(book, text)] of the World English Bible, in module (NRSVA) order."""
    module = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    books: dict[str, list[str]] = {}
    for testament in ("ot", "nt"):
        bzs, bzz, bzv = ((module / f"{testament}.{ext}").read_bytes() for ext in ("bzs", "bzz", "bzv"))
        blocks = [zlib.decompress(bzz[off:off + size]) if size else b""
                  for off, size, _ in struct.iter_unpack("<3I", bzs)]
        seen, verses = set(), []
        for entry in struct.iter_unpack("<IIH", bzv):  # (block, offset, size) per verse key
            block, offset, size = entry
            if size and entry not in seen:  # linked verses point at the same text several times
                seen.add(entry)
                verses.append(blocks[block][offset:offset + size].decode())
        # A NUL between entries marks verse ends that survive markup stripping.
        for book, _, body in WEB_CHAPTER.findall("\n\0\n".join(verses)):
            if book not in WEB_SKIP:
                lines = (osis_to_text(verse) for verse in body.split("\0"))
                books.setdefault(book, []).extend(line for line in lines if line)
    order = [(book, "\n".join(lines) + "\n") for book, lines in books.items()]
    return {"train": [b for i, b in enumerate(order) if i % 12 != 11],
            "heldout": [b for i, b in enumerate(order) if i % 12 == 11]}


LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()  # lexicographer file number -> name, as in WordNet's lexnames(5)
SUPERSENSE_PER_LABEL = {"train": 1750, "test": 250}
GLOSS_CAP = 2_000_000


def wordnet_synsets(root: Path) -> list[tuple[str, str]]:
    """(lexname, gloss) of every synset in data.noun/verb/adj/adv."""
    synsets = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"usr/share/wordnet/data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):  # licence header
                continue
            fields, _, gloss = line.partition(" | ")
            synsets.append((LEXNAMES[int(fields.split()[1])], gloss.strip()))
    return synsets


def wordnet(root: Path) -> dict[str, list[str]]:
    """Supersense task lines per split, plus plain glosses ("glosses") for language modelling."""
    synsets = wordnet_synsets(root)
    labels: dict[str, set[str]] = {}
    for lexname, gloss in synsets:
        labels.setdefault(gloss, set()).add(lexname)
    task = {"train": [], "test": []}
    for label in SUPERSENSE_LABELS:
        # A gloss shared by synsets of different supersenses has no single answer: leave it out.
        pool = sorted((g for g, names in labels.items() if names == {f"noun.{label}"}), key=sha_key)
        need = sum(SUPERSENSE_PER_LABEL.values())
        if len(pool) < need:
            raise ValueError(f"only {len(pool)} unambiguous noun.{label} glosses, need {need}")
        task["test"] += [f"{g}{SEPARATOR}{label}" for g in pool[:SUPERSENSE_PER_LABEL["test"]]]
        task["train"] += [f"{g}{SEPARATOR}{label}" for g in pool[SUPERSENSE_PER_LABEL["test"]:need]]
    test_glosses = {line.rpartition(SEPARATOR)[0] for line in task["test"]}
    glosses, size = [], 0
    for gloss in sorted((g for g in labels if g not in test_glosses), key=sha_key):
        if size + len(gloss) + 1 > GLOSS_CAP:
            break
        glosses.append(gloss)
        size += len(gloss) + 1
    return {"train": sorted(task["train"], key=sha_key), "test": sorted(task["test"], key=sha_key),
            "glosses": glosses}


PY_EXCLUDE = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
PY_TRAIN_CAP = 3_000_000


def python_stdlib() -> dict[str, list[tuple[str, str]]]:
    """Split -> [(path, source)] of the stdlib's .py files, each source headed by `# file: path`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p.relative_to(stdlib).as_posix() for p in stdlib.rglob("*.py")
                   if not PY_EXCLUDE & set(p.relative_to(stdlib).parts[:-1]))
    split = {"train": [], "heldout": []}
    size, full = 0, False
    for i, name in enumerate(files):
        source = f"# file: {name}\n" + (stdlib / name).read_text(encoding="utf-8").rstrip("\n") + "\n"
        if i % 20 == 19:
            split["heldout"].append((name, source))
        elif not full:
            full = size + len(source) > PY_TRAIN_CAP  # a prefix of the sorted files, not a size-picked subset
            if not full:
                split["train"].append((name, source))
                size += len(source)
    return split


# --- output -----------------------------------------------------------------------------------

def write_xz(out: Path, name: str, split: str, text: str) -> dict:
    """Write one split and return its manifest entry."""
    data = text.encode("utf-8")
    file = out / filename(name, split)
    file.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET))
    return {"file": file.name, "characters": len(text), "lines": text.count("\n"), "bytes_utf8": len(data),
            "bytes_xz": file.stat().st_size}


def notice(roots: dict[str, Path], versions: dict[str, str], py_license: str) -> str:
    """NOTICE text: where each corpus comes from and the licence it is under."""
    doc = {key: roots[key] / f"usr/share/doc/{pkg}/copyright" for key, pkg in PACKAGES.items()}
    sections = {
        "austen-*.txt.xz":
            f"Jane Austen's six novels, from the Debian package r-cran-janeaustenr {versions['austen']}\n"
            "(the R package janeaustenr by Julia Silge). The novels are in the public domain; the\n"
            "package is under the MIT licence:\n\nCopyright: 2016-2017 Julia Silge\n\n"
            + dep5_license(doc["austen"], "MIT"),
        "web-*.txt.xz":
            "Text derived from the World English Bible (WEB), from the Debian package sword-text-web\n"
            f"{versions['web']} (SWORD module engWEB2015eb). Footnotes, headings, introductions and the\n"
            "glossary were removed and the markup stripped, so this is not the World English Bible itself.\n"
            "\"World English Bible\" is a trademark of eBible.org. The licence statement:\n\n"
            + dep5_license(doc["web"], "public-domain"),
        "wordnet-*.txt.xz":
            "Glosses and lexicographer-file (supersense) labels from WordNet 3.0, Debian package\n"
            f"wordnet-base {versions['wordnet']}.\n\n"
            "Copyright: 1996-2012 Cognitive Science Laboratory Princeton University\n\n"
            + dep5_license(doc["wordnet"], "WordNet3.0"),
        "python-*.txt.xz":
            f"Source files of the Python {versions['python']} standard library (CPython), under the\n"
            "Python Software Foundation License Version 2:\n\n" + py_license,
    }
    head = ("Corpora derived from third-party works by infra/zoo/build_corpora.py. Each source's\n"
            "licence or notice follows.\n")
    rule = "=" * 78
    return head + "".join(f"\n{rule}\n{files}\n{rule}\n\n{body.strip()}\n" for files, body in sections.items())


def psf_license() -> str:
    """The PSF licence agreement from CPython's LICENSE.txt (as the licence asks to keep it)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    return text[start:text.index("BEOPEN.COM LICENSE AGREEMENT", start)].strip()


def build(out: Path, debs: Path | None = None) -> dict:
    """Build every corpus into `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    versions = {"python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(prefix="corpora-") as tmp:
        roots = {}
        for key, pkg in PACKAGES.items():
            roots[key], versions[key] = unpack(pkg, debs, Path(tmp))
        texts = {"austen": austen(roots["austen"]), "web": web(roots["web"]), "python": python_stdlib()}
        nets = wordnet(roots["wordnet"])
        notice_text = notice(roots, versions, psf_license())

    def corpus(key: str, source: str, license: str) -> dict:
        return {"source": source, "version": versions[key], "license": license, "splits": {}}

    manifest = {
        "austen": corpus("austen", PACKAGES["austen"], "novels public domain; package MIT"),
        "web": corpus("web", PACKAGES["web"], "public domain; derived from the World English Bible (a trademark)"),
        "wordnet-supersense": corpus("wordnet", PACKAGES["wordnet"], "WordNet 3.0 license"),
        "wordnet-glosses": corpus("wordnet", PACKAGES["wordnet"], "WordNet 3.0 license"),
        "python": corpus("python", f"CPython {versions['python']} stdlib", "PSF-2.0"),
    }
    for name, parts in texts.items():
        for split, items in parts.items():
            entry = write_xz(out, name, split, "\n".join(text for _, text in items))
            manifest[name]["splits"][split] = {**entry, "parts": [part for part, _ in items]}
    for name, split, key in (("wordnet-supersense", "train", "train"), ("wordnet-supersense", "test", "test"),
                             ("wordnet-glosses", "train", "glosses")):
        entry = write_xz(out, name, split, "\n".join(nets[key]) + "\n")
        manifest[name]["splits"][split] = {**entry, "examples": len(nets[key])}
    files = sorted(s["file"] for corpus in manifest.values() for s in corpus["splits"].values())
    (out / "MANIFEST.sha256").write_text(
        "".join(f"{hashlib.sha256((out / f).read_bytes()).hexdigest()}  {f}\n" for f in files))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    (out / "NOTICE").write_text(notice_text)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debs", type=Path, help="folder with the .deb files (else apt-get download)")
    parser.add_argument("--out", type=Path, default=ROOT, help=f"output folder (default {ROOT})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = build(args.out, args.debs)
    for name, corpus in manifest.items():
        for split, entry in corpus["splits"].items():
            print(f"{entry['file']:36} {entry['characters']:>10,} chars {entry['lines']:>8,} lines "
                  f"{entry['bytes_xz']:>10,} bytes xz")
    print(f"built in {time.perf_counter() - start:.1f} s into {args.out}")


if __name__ == "__main__":
    main()
