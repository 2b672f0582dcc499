"""The calibration and evaluation texts, named by URI (a file, file://, s3:// or zoo://text/<name>),
and what the model sees of them: windows of tokens from the checkpoint's own tokenizer (so one
text serves every model; the runs record which text and how many windows it gave), as next-token
examples or, for encoder-decoder models, span-corruption ones.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import torch

from ..errors import CheckpointError, ExpertbitsError
from ..records import TextRecord
from ..store.storage import open_fs


def _fix() -> str:
    from expertbits.zoo import available_texts

    return f"give a UTF-8 text file, an s3:// object or a bundled zoo://text/<name> ({', '.join(available_texts())})"


def read_text(uri: str, storage_options: dict) -> str:
    if uri.startswith("zoo://"):
        from expertbits.zoo import read_text as read_zoo_text

        try:
            return read_zoo_text(uri)
        except FileNotFoundError as e:
            raise ExpertbitsError(f"{uri}: {e.args[0] if e.args else 'no such bundled text'}", _fix()) from e
    fs, path = open_fs(uri.removeprefix("file://") if uri.startswith("file://") else uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read().decode()
    except FileNotFoundError as e:
        raise ExpertbitsError(f"{uri}: no such text file", _fix()) from e
    except IsADirectoryError as e:
        raise ExpertbitsError(f"{uri}: a folder, not a text file", _fix()) from e
    except UnicodeDecodeError as e:
        raise ExpertbitsError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start})", _fix()) from e


def pin(uri: str, cache_dir: str | Path | None, storage_options: dict) -> TextRecord:
    """Read a text once and keep its bytes in the local cache by digest: the record every stage
    of a run is given, so a text rewritten during the run is keyed and used as it was pinned."""
    data = read_text(uri, storage_options).encode()
    record = TextRecord(uri=uri, digest=hashlib.sha256(data).hexdigest())
    path = _cached(record, cache_dir)
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != record.digest:  # absent or damaged
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.incoming-{uuid.uuid4().hex}")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)  # whole or absent
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return record


def pinned(record: TextRecord, cache_dir: str | Path | None, storage_options: dict) -> str:
    """The text a record pinned: from the local cache, or (a machine that has not cached it, a
    Dask worker) read again from its URI, which must still hold the same bytes."""
    path = _cached(record, cache_dir)
    if path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == record.digest:
            return data.decode()
    data = read_text(record.uri, storage_options).encode()
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.digest:
        raise ExpertbitsError(f"{record.uri} changed since this run read it (sha256 {digest[:12]}, pinned "
                              f"{record.digest[:12]}) and this machine has no copy of the text it pinned",
                              "rerun the flow; keep a text unchanged while runs use it, or give a new name to a new text")
    pin(record.uri, cache_dir, storage_options)  # cached for the next stage on this machine
    return data.decode()


def _cached(record: TextRecord, cache_dir: str | Path | None) -> Path:
    from .fetch import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "texts" / f"{record.digest}.txt"


def check_text(uri: str) -> None:
    """What can be checked of a text before any work: a local file exists, a bundled name is known."""
    if uri.startswith("zoo://"):
        from expertbits.zoo import available_texts

        name = uri.removeprefix("zoo://").removeprefix("text/").rstrip("/")
        if name not in available_texts():
            raise ExpertbitsError(f"{uri}: no bundled text of that name", _fix())
    elif "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise ExpertbitsError(f"{uri}: {'a folder, not a text file' if path.is_dir() else 'no such file'}", _fix())
    elif not uri.startswith("s3://"):
        raise ExpertbitsError(f"{uri}: unsupported text URI", _fix())


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer: any text is cut into windows with it, whatever its vocabulary."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never the code a checkpoint ships
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                              "save the tokenizer beside the weights: tokenizer.save_pretrained(folder)") from e


def text_examples(path: Path, text: str, seq_len: int, windows: int, seq2seq: bool) -> tuple[object, list]:
    """(tokenizer, examples) of `windows` windows of `text`, tokenized by the checkpoint at `path`."""
    tokenizer = load_tokenizer(path)
    return tokenizer, examples(token_windows(text, tokenizer, seq_len, windows), tokenizer, seq2seq)


def token_windows(text: str, tokenizer, seq_len: int, windows: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // seq_len
    if available == 0:
        raise CheckpointError(f"the text has {len(ids)} tokens with this checkpoint's tokenizer, fewer than one window "
                              f"of {seq_len}", "give a longer --eval-text / --calibration-text, or a smaller --eval-seq-len")
    n = min(windows, available)
    starts = [round(i * (available - 1) / max(1, n - 1)) * seq_len for i in range(n)] if n > 1 else [0]
    return torch.tensor([ids[s : s + seq_len] for s in starts])


def examples(ids: torch.Tensor, tokenizer, seq2seq: bool) -> list[tuple[dict, torch.Tensor]]:
    """(model inputs, target tokens) per window: next tokens, or span-corruption targets."""
    if not seq2seq:
        return [({"input_ids": w[None]}, w[1:]) for w in ids]
    from .span_corruption import sentinel_ids, span_corrupt

    gen, sentinels = torch.Generator().manual_seed(0), sentinel_ids(tokenizer)
    out = []
    for w in ids:
        x, y = span_corrupt(w.tolist(), sentinels, tokenizer.eos_token_id, gen)
        out.append(({"input_ids": torch.tensor([x]), "labels": torch.tensor([y])}, torch.tensor(y)))
    return out
