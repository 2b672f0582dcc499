"""The committed corpora: readable, intact, and with held-out parts that never leak into train."""

import json
import re
import struct
from collections import Counter

import pytest

from expertbits.zoo import corpora
from expertbits.zoo.build_corpora import RReader, osis_to_text

SPLITS = [(name, split) for name, splits in corpora.CORPORA.items() for split in splits]


@pytest.mark.parametrize("name,split", SPLITS)
def test_every_corpus_reads_and_is_substantial(name, split):
    text = corpora.read(name, split)
    assert len(text) > 100_000
    assert text.endswith("\n") and "\0" not in text


def test_manifest_verifies_and_matches_contents():
    assert corpora.verify() == []
    listed = [line.split("  ")[1] for line in corpora.MANIFEST.read_text().splitlines()]
    assert listed == sorted(corpora.filename(name, split) for name, split in SPLITS)
    manifest = json.loads((corpora.ROOT / "manifest.json").read_text())
    for name, split in SPLITS:
        assert manifest[name]["splits"][split]["characters"] == len(corpora.read(name, split))
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (corpora.ROOT / "NOTICE").read_text()


def test_verify_reports_a_damaged_file(tmp_path, monkeypatch):
    bad = tmp_path / "MANIFEST.sha256"
    bad.write_text("0" * 64 + "  austen-train.txt.xz\n")
    monkeypatch.setattr(corpora, "MANIFEST", bad)
    assert corpora.verify() == ["austen-train.txt.xz"]


def test_unknown_names_are_explained():
    with pytest.raises(ValueError, match="available: .*austen"):
        corpora.read("shakespeare", "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        corpora.path("austen", "test")


def test_persuasion_is_only_held_out():
    train, heldout = corpora.read("austen", "train"), corpora.read("austen", "heldout")
    assert "Sir Walter Elliot, of Kellynch Hall" in heldout
    assert "Kellynch" not in train
    assert "It is a truth universally acknowledged" in train


def test_web_is_plain_text_split_by_book():
    train, heldout = corpora.read("web", "train"), corpora.read("web", "heldout")
    for text in (train, heldout):
        assert not re.search(r"<verse|<note|osisID|<[a-zA-Z/]", text)
    assert "In the beginning, God created the heavens and the earth." in train
    assert "Now faith is assurance of things hoped for" in heldout  # Hebrews, the 72nd book
    assert "Now faith is assurance" not in train


def test_supersense_task_is_balanced_and_disjoint():
    train, test = corpora.supersense_examples("train"), corpora.supersense_examples("test")
    assert Counter(label for _, label in test) == {label: 250 for label in corpora.SUPERSENSE_LABELS}
    assert Counter(label for _, label in train) == {label: 1750 for label in corpora.SUPERSENSE_LABELS}
    test_glosses = {gloss for gloss, _ in test}
    assert not test_glosses & {gloss for gloss, _ in train}
    assert not test_glosses & set(corpora.read("wordnet-glosses", "train").splitlines())


def test_python_held_out_files_are_not_in_train():
    def files(split):
        return re.findall(r"^# file: (\S+)$", corpora.read("python", split), re.M)
    train, heldout = files("train"), files("heldout")
    assert len(heldout) > 20 and len(train) > 100
    assert not set(train) & set(heldout)
    assert not any(part in ("test", "tests") for name in train + heldout for part in name.split("/")[:-1])


def test_osis_markup_is_stripped():
    osis = ('<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>Elohim</note>'
            '<w lemma="x">created</w> <title type="main">Genesis</title><l level="1" sID="a"/>light'
            ' <note>n</note>?&amp;')
    assert osis_to_text(osis) == "God created light?&"


def test_r_reader_reads_a_named_character_vector():
    def ints(*values):
        return struct.pack(f">{len(values)}i", *values)

    def charsxp(text):
        return ints(0x40009, len(text)) + text.encode()

    blob = (b"X\n" + ints(3, 0x40201, 0x30500, 5) + b"UTF-8"
            + ints(16 | 1 << 9, 2) + charsxp("Emma") + ints(9, -1)          # c("Emma", NA) with attributes
            + ints(2 | 1 << 10, 1) + charsxp("names")                      # pairlist cell tagged `names`
            + ints(16, 2) + charsxp("a") + charsxp("b") + ints(254))
    value = RReader(blob).read()
    assert value == ["Emma", None] and value.attrs == {"names": ["a", "b"]}
    assert value.named() == {"a": "Emma", "b": None}


def test_zoo_text_uris_name_corpus_splits_and_small_texts():
    from expertbits.zoo import available_texts, read_text

    assert "Sir Walter Elliot" in read_text("zoo://text/austen-heldout")
    assert read_text("zoo://text/code-heldout").startswith("\"\"\"")
    assert {"austen-heldout", "web-heldout", "python-heldout", "wordnet-supersense-test", "code-heldout"} <= set(available_texts())
    with pytest.raises(FileNotFoundError, match="available"):
        read_text("zoo://text/austen-nope")
