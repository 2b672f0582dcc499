"""Find checkpoints under watched prefixes, tell complete from still-uploading, and fingerprint content.

A watched prefix is a folder or `file://` / `s3://` prefix under which each folder holding a
`config.json` is a checkpoint, or `hf://org/name` (one checkpoint, whose current revision is
resolved to its commit). A checkpoint is announced only when complete:

  * `config.json` and at least one `*.safetensors` are present;
  * with `model.safetensors.index.json`, every shard it names is present;
  * every shard is at least as long as its own header says (8-byte length + JSON header + the
    largest tensor end offset): a shard still being copied is shorter.

Its content digest is the sha256 of the sorted `name size content-id` lines of the files
expertbits reads, where content-id is the object's ETag on S3 (the MD5 of its bytes for a
single-part upload, so the same bytes uploaded again keep it) and the sha256 of the bytes on a
local disk. The same bytes give the same digest whatever their modification time.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from ..store.storage import open_fs
from .fetch import wanted

MAX_HEADER = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class Found:
    uri: str
    revision: str | None  # hf commit; None for stores without revisions
    digest: str | None  # None while incomplete
    incomplete: str | None  # why it is not announced yet


def _scheme(prefix: str) -> str:
    return prefix.split("://", 1)[0] if "://" in prefix else "file"


def under(uri: str, prefixes: list[str]) -> bool:
    """Whether a checkpoint URI lies inside one of the watched prefixes (no `..` tricks)."""
    norm = posixpath.normpath(uri.removeprefix("file://"))
    for prefix in prefixes:
        root = posixpath.normpath(prefix.removeprefix("file://").rstrip("/"))
        if prefix.startswith("hf://"):
            if uri.split("@", 1)[0] == prefix.rstrip("/"):
                return True
        elif ".." not in uri.split("/") and (norm == root or norm.startswith(root + "/")):
            return True
    return False


def scan(prefix: str, storage_options: dict[str, Any] | None = None) -> list[Found]:
    """Every checkpoint under one watched prefix; raises StoreError if the prefix cannot be listed."""
    if prefix.startswith("hf://"):
        return [_hf(prefix)]
    scheme = _scheme(prefix)
    try:
        fs, root = open_fs(prefix.removeprefix("file://"), storage_options if scheme == "s3" else None)
        if scheme == "s3":
            fs.invalidate_cache()
        infos = fs.find(root.rstrip("/"), detail=True)
    except Exception as e:  # an unreachable store must fail the watcher, never look empty
        raise StoreError(f"cannot list watched prefix {prefix}: {type(e).__name__}: {e}",
                         "check the prefix, the endpoint and the credentials in the worker's environment") from e
    folders: dict[str, dict[str, dict]] = {}
    for key, info in infos.items():
        folder, _, name = key.rpartition("/")
        folders.setdefault(folder, {})[name] = info
    out = []
    for folder, files in sorted(folders.items()):
        if "config.json" not in files:
            continue
        uri = f"s3://{folder}" if scheme == "s3" else (f"file://{folder}" if prefix.startswith("file://") else folder)
        reason = _incomplete(fs, folder, files)
        out.append(Found(uri, None, None if reason else _digest(fs, folder, files, scheme), reason))
    return out


SHARD = re.compile(r"-\d{5}-of-(\d{5})\.safetensors$")


def _incomplete(fs, folder: str, files: dict[str, dict]) -> str | None:
    """Why the checkpoint is not complete yet, or None. Anything unreadable is a reason, never an
    exception: one bad upload must not stop the watcher announcing the others."""
    try:
        return _check(fs, folder, files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error) as e:
        return f"unreadable ({type(e).__name__}: {e})"


def _check(fs, folder: str, files: dict[str, dict]) -> str | None:
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    if not shards:
        return "no *.safetensors yet"
    numbered = [m for n in shards if (m := SHARD.search(n))]
    if numbered and "model.safetensors.index.json" not in files:
        return f"sharded ({len(shards)} of {int(numbered[0][1])} shards so far) but no model.safetensors.index.json yet"
    if numbered and len(shards) < int(numbered[0][1]):
        return f"{len(shards)} of {int(numbered[0][1])} shards so far"
    if "model.safetensors.index.json" in files:
        try:
            index = json.loads(fs.cat_file(f"{folder}/model.safetensors.index.json"))
            named = set(index["weight_map"].values())
        except (ValueError, KeyError) as e:
            return f"model.safetensors.index.json unreadable ({e})"
        if not isinstance(named, set) or not named:
            return "model.safetensors.index.json names no shards"
        if missing := sorted(named - set(shards)):
            return f"shards named by the index are missing: {missing[:3]}"
    for name in shards:
        size = files[name].get("size") or 0
        if size < 8:
            return f"{name} is {size} bytes, shorter than a safetensors header"
        with fs.open(f"{folder}/{name}", "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER or 8 + length > size:
                return f"{name} is {size} bytes, shorter than its header says"
            try:
                header = json.loads(f.read(length))
            except ValueError:
                return f"{name}: header not yet readable"
        if not isinstance(header, dict):
            return f"{name}: header is not a JSON object"
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            return f"{name} is {size} bytes of {8 + length + end}: still being written"
    return None


def _digest(fs, folder: str, files: dict[str, dict], scheme: str) -> str:
    lines = []
    for name, info in sorted(files.items()):
        if not wanted(name):
            continue
        if scheme == "s3":
            content = str(info.get("ETag", "")).strip('"')
        else:
            h = hashlib.sha256()
            with fs.open(f"{folder}/{name}", "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            content = h.hexdigest()
        lines.append(f"{name} {info.get('size')} {content}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _hf(prefix: str) -> Found:
    """hf://org/name: the current revision's commit; its digest is the commit (a commit names fixed files)."""
    from huggingface_hub import HfApi

    repo = prefix.removeprefix("hf://").rstrip("/").split("@", 1)[0]
    try:
        sha = HfApi().model_info(repo).sha
    except Exception as e:
        raise StoreError(f"cannot resolve {prefix} on the Hugging Face hub: {type(e).__name__}: {e}",
                         "check the repository name, the network and HF_TOKEN in the worker's environment") from e
    return Found(f"hf://{repo}@{sha}", sha, hashlib.sha256(f"hf:{repo}@{sha}".encode()).hexdigest(), None)
