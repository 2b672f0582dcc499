"""The calibration and evaluation texts, named by URI: a file, file://, s3:// or zoo://text/<name>.

Text is tokenized by each checkpoint's own tokenizer where it is used (evaluate.token_windows),
so one text serves every model; the runs record which text and how many windows it gave.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ExpertbitsError
from .storage import open_fs


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
