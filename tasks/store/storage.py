"""The one storage seam: every artifact path is a URI, opened through fsspec.

A store is a root URI (a local folder by default, `s3://bucket/prefix` in production). Stage
outputs are written under `objects/<stage>/<key>/` (content-addressed, so a cached task result
always points at complete files) and a finished run is published under `runs/<run-id>/` with its
manifest written last. `staging()` removes whatever a failed writer left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec

from ..errors import StoreError

TMP_MARK = ".expertbits-tmp-"  # in the name of a local file being written; `expertbits gc` removes old ones


def open_fs(uri: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, path) for a URI; plain paths are local files."""
    options = dict(storage_options or {}) if _scheme(uri) == "s3" else {}
    return fsspec.url_to_fs(uri, **options)


def modified(info: dict) -> float | None:
    """When a listed file was last written (seconds since the epoch), from an fsspec info dict:
    local files give `mtime`, S3 objects `LastModified`."""
    t = info.get("mtime") or info.get("LastModified") or info.get("created")
    if t is None:
        return None
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Store:
    """Read and write artifacts relative to a root URI."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        if _scheme(root) == "file":
            root = str(Path(root.removeprefix("file://")).expanduser().resolve())
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self._base = open_fs(self.root, self.storage_options)
        self.is_local = _scheme(self.root) == "file"

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _path(self, rel: str) -> str:
        return posixpath.join(self._base, rel) if rel else self._base

    def check_reachable(self) -> None:
        """Write, read back and delete a probe object; raise StoreError if any step fails."""
        probe = f".expertbits-probe-{uuid.uuid4().hex}"
        try:
            if self.is_local:
                os.makedirs(self._base, exist_ok=True)
            elif not self.fs.exists(self._base.split("/", 1)[0]):
                raise FileNotFoundError(f"bucket {self._base.split('/', 1)[0]!r} does not exist")
            self.write_bytes(probe, b"ok")
            if self.read_bytes(probe) != b"ok":
                raise OSError("probe object read back differently")
            self.fs.rm(self._path(probe))
        except StoreError:
            raise
        except Exception as e:  # any transport error means the same thing to the user
            raise StoreError(
                f"store {self.root} is unreachable or not writable: {type(e).__name__}: {e}",
                "check the URI, that the bucket exists, the endpoint_url and credentials in "
                "--storage-option, or use a local folder as --store",
            ) from e

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        if self.is_local:
            with _replacing(path) as tmp, open(tmp, "wb") as f:
                f.write(data)
            return
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        if not self.is_local:  # s3fs opens by the ETag it listed; another process may have rewritten it since
            self.fs.invalidate_cache(self._path(rel))
        with self.fs.open(self._path(rel), "rb") as f:
            return f.read()

    def put_file(self, local: str | Path, rel: str) -> None:
        path = self._path(rel)
        if self.is_local:
            with _replacing(path) as tmp:
                shutil.copyfile(local, tmp)
            return
        self.fs.put_file(str(local), path)

    def sha256(self, rel: str, chunk: int = 1 << 22) -> str:
        """sha256 of a stored file, streamed (local or remote)."""
        h = hashlib.sha256()
        if not self.is_local:
            self.fs.invalidate_cache(self._path(rel))
        with self.fs.open(self._path(rel), "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        return h.hexdigest()

    def get_file(self, rel: str, local: str | Path) -> Path:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(rel), str(local))
        return Path(local)

    def copy(self, src_rel: str, dst_rel: str) -> None:
        """Copy within the store: a new file on local disk (never a hard link: editing a run's file
        must not change the cached object), a server-side copy on S3."""
        src, dst = self._path(src_rel), self._path(dst_rel)
        if self.is_local:
            with _replacing(dst) as tmp:
                shutil.copyfile(src, tmp)
            return
        self.fs.copy(src, dst)

    def rename_dir(self, src_rel: str, dst_rel: str) -> None:
        """Local stores only: move a folder in one step (fails if `dst_rel` exists and is not empty)."""
        assert self.is_local, "S3 has no rename; visibility.py makes runs visible by writing the manifest last"
        os.makedirs(posixpath.dirname(self._path(dst_rel)), exist_ok=True)
        os.rename(self._path(src_rel), self._path(dst_rel))

    def remove(self, rel: str) -> None:
        """Remove a file or a prefix; nothing there (or removed meanwhile by another process) is fine."""
        path = self._path(rel)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        if not self.is_local:
            self.fs.invalidate_cache()

    def list(self, rel: str) -> list[str]:
        """Files under a prefix, relative to it."""
        base = self._path(rel).rstrip("/")
        if not self.fs.exists(base):
            return []
        return sorted(p[len(base) + 1 :] for p in self.fs.find(base))

    def list_dirs(self, rel: str) -> list[str]:
        """The names of the folders (prefixes) directly under `rel`."""
        base = self._path(rel).rstrip("/")
        if not self.is_local:
            self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False)
                      if self.fs.isdir(p))

    @contextlib.contextmanager
    def staging(self, rel: str) -> Iterator[str]:
        """Yield a prefix to write into; on any exception, remove it so nothing half-written stays."""
        try:
            yield rel
        except BaseException:
            with contextlib.suppress(Exception):
                self.remove(rel)
            raise


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[str]:
    """Yield a temporary name beside `path`; once it is written, rename it over `path` (atomic on
    POSIX). On any error the temporary file is removed and `path` is left as it was."""
    folder, name = posixpath.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f"{TMP_MARK}{uuid.uuid4().hex}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
