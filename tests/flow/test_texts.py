"""Texts are pinned once per flow, like checkpoints: a text rewritten while a run goes on is keyed
and used as it was first read, on every stage."""

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from expertbits.zoo import text_path

pytestmark = pytest.mark.integration


def _quantize(params: dict, **kw):
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    return quantize_moe(QuantizeParams(**dict(params, **kw)))


def _metrics(manifest) -> dict:
    ev = json.loads((Path(manifest.uri) / "evaluation" / "evaluation.json").read_text())
    return {k: v for k, v in ev.items() if k != "text"}


def test_a_text_rewritten_during_a_run_is_keyed_and_used_as_pinned(prefect_api, params, tmp_path):
    base = text_path("code-heldout").read_text()
    originals = {name: (base + f"\n# {name} {uuid.uuid4().hex}\n").encode() for name in ("eval", "calib")}  # new
    rewritten = text_path("docs-heldout").read_text().encode()
    files = {name: tmp_path / f"{name}.txt" for name in originals}
    for name, data in originals.items():
        files[name].write_bytes(data)
    cache = Path(os.environ["EXPERTBITS_CACHE"]) / "texts"
    pinned = [cache / f"{hashlib.sha256(data).hexdigest()}.txt" for data in originals.values()]
    assert not any(p.exists() for p in pinned)

    def rewrite_once_pinned():  # as soon as the run has read both texts, both change on disk
        deadline = time.monotonic() + 300
        while not all(p.exists() for p in pinned) and time.monotonic() < deadline:
            time.sleep(0.005)
        for f in files.values():
            f.write_bytes(rewritten)

    writer = threading.Thread(target=rewrite_once_pinned)
    writer.start()
    texts = dict(eval_text=str(files["eval"]), calibration_text=str(files["calib"]))
    during = _quantize(params, **texts, store=str(tmp_path / "a"))
    writer.join()
    assert all(f.read_bytes() == rewritten for f in files.values())  # the texts did change while the run went on

    # the original bytes, untouched, in another store: the routing key (under the calibration key,
    # which holds no store) and the evaluation's numbers are the same, so both saw what was pinned
    (tmp_path / "kept").mkdir()
    for name, data in originals.items():
        (tmp_path / "kept" / f"{name}.txt").write_bytes(data)
    kept = _quantize(params, eval_text=str(tmp_path / "kept" / "eval.txt"),
                     calibration_text=str(tmp_path / "kept" / "calib.txt"), store=str(tmp_path / "b"))
    assert during.stages["calibration"] == kept.stages["calibration"]
    assert _metrics(during) == _metrics(kept)
    # and the rewritten bytes are another text: another key, other numbers
    changed = _quantize(params, **texts, store=str(tmp_path / "c"))
    assert changed.stages["calibration"] != during.stages["calibration"] and _metrics(changed) != _metrics(during)


def test_a_worker_without_the_pinned_copy_refuses_a_changed_text(tmp_path):
    from expertbits.tasks.checkpoints.texts import pin, pinned
    from expertbits.tasks.errors import ExpertbitsError

    text = tmp_path / "t.txt"
    text.write_text("first words")
    record = pin(str(text), tmp_path / "cache", {})
    text.write_text("other words")
    assert pinned(record, tmp_path / "cache", {}) == "first words"  # from the cache, whatever the file says
    with pytest.raises(ExpertbitsError, match="changed since this run read it"):
        pinned(record, tmp_path / "elsewhere", {})  # another machine's cache: read again, and refused
    text.write_text("first words")
    assert pinned(record, tmp_path / "elsewhere", {}) == "first words"
    (tmp_path / "cache" / "texts" / f"{record.digest}.txt").write_text("damaged")  # the cached copy, damaged
    assert pinned(record, tmp_path / "cache", {}) == "first words"  # read again from the URI, and repaired
    assert (tmp_path / "cache" / "texts" / f"{record.digest}.txt").read_text() == "first words"
