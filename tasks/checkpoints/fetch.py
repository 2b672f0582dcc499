"""Stage 1: bring a checkpoint into a content-addressed local cache and verify it.

Sources: a local folder or `file://` URI, `zoo://family/variant` (bundled), `s3://bucket/prefix`
(s3fs), and `hf://org/name@revision` (huggingface_hub). Files land in
`<cache>/checkpoints/<digest>/` where the digest is the sha256 of the sorted per-file sha256
manifest, so two URIs with the same bytes share one entry and a changed file is a new entry.
Only what expertbits reads is fetched: config, safetensors, tokenizer files.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CheckpointError, remember_source
from ..store.storage import open_fs, sha256_file
from .adapters import detect
from .reader import Checkpoint, read_safetensors_header

# The model card (README.md) is not fetched: its prose is not the model, and an edited card must not
# requantize. The base model it declares is read from the source itself (`read_card`).
PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")
MANIFEST = "expertbits-manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them holds the vocabulary


@dataclass(frozen=True)
class LocalCheckpoint:
    uri: str
    path: Path
    digest: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("EXPERTBITS_CACHE", Path.home() / ".cache" / "expertbits")).expanduser()


def wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in PATTERNS)


def fingerprint(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A cheap identity of the source's current contents (names, sizes, mtimes or ETags), for cache keys."""
    scheme, location = _split(uri)
    if scheme == "hf":  # a commit names fixed contents; a branch or no revision is resolved to its commit now
        repo, commit = resolve_hf(location, uri)
        return f"hf:{repo}@{commit}"
    fs, root = open_fs(location if scheme != "file" else str(location), storage_options if scheme == "s3" else None)
    if scheme == "s3":
        fs.invalidate_cache(root)
    try:
        infos = fs.find(root, detail=True)
    except FileNotFoundError:
        infos = {}
    parts = sorted(
        (k[len(root):], v.get("size"), v.get("ETag") or v.get("mtime") or v.get("LastModified"))
        for k, v in infos.items() if wanted(k.rsplit("/", 1)[-1])
    )
    return hashlib.sha256(json.dumps([uri, parts], default=str).encode()).hexdigest()


def _split(uri: str) -> tuple[str, str]:
    if uri.startswith("zoo://"):
        from expertbits.zoo import resolve

        try:
            return "file", str(resolve(uri))
        except FileNotFoundError as e:
            raise CheckpointError(f"{uri}: {e.args[0] if e.args else e}", "name a bundled model, e.g. zoo://mixtral-tiny/wordnet") from e
    if uri.startswith("hf://"):
        return "hf", uri.removeprefix("hf://")
    if uri.startswith("s3://"):
        if any(part in ("..", ".") for part in uri.removeprefix("s3://").split("/")):
            raise CheckpointError(f"{uri}: a '.' or '..' segment in an S3 key", "name the prefix as it is stored, without '..'")
        return "s3", uri.rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise CheckpointError(f"unsupported checkpoint URI {uri!r}", "use a folder, file://, s3://, hf://org/name@revision or zoo://")
    return "file", str(Path(uri.removeprefix("file://")).expanduser().resolve())


def check_source(uri: str, storage_options: dict[str, Any] | None = None, remote: bool = False,
                 tokenizer: bool = True) -> None:
    """What can be checked of a checkpoint source before any work, without fetching it: the URI's
    form, a bundled name, a local folder holding config.json, safetensors, a MoE layout expertbits
    knows and (unless `tokenizer` is False: a reference needs only its routers) a tokenizer; with
    `remote`, also that an s3:// prefix holds a config.json and an hf:// repository resolves."""
    scheme, location = _split(uri)
    fix = "point at a checkpoint folder holding config.json and *.safetensors (what save_pretrained writes)"
    if scheme == "file":
        folder = Path(location)
        shown = uri if uri.removeprefix("file://") == location else f"{uri} ({location})"
        if not folder.exists():
            raise CheckpointError(f"{shown}: no such folder", fix)
        if not folder.is_dir():
            raise CheckpointError(f"{shown}: a file, not a checkpoint folder", fix)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{shown}: no config.json in this folder", fix)
        if not any(folder.glob("*.safetensors")):
            pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
            raise CheckpointError(f"{shown}: no *.safetensors files" + (f" (found pickle files {pickles})" if pickles else ""),
                                  "expertbits reads safetensors only; convert with model.save_pretrained(dir)")
        if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(f"{shown}: no tokenizer ({' or '.join(TOKENIZER_FILES)})",
                                  "save the tokenizer beside the weights: tokenizer.save_pretrained(folder); the "
                                  "calibration and evaluation texts are cut into tokens with it")
        remember_source(location, uri, cached=False)
        with Checkpoint.open(folder) as ckpt:  # headers only: a dense model or an unknown layout fails here
            detect(ckpt)
    elif scheme == "hf":
        repo = location.partition("@")[0]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise CheckpointError(f"{uri}: expected hf://org/name[@revision]", "e.g. hf://mistralai/Mixtral-8x7B-v0.1")
        if remote:
            resolve_hf(location, uri)
    elif scheme == "s3":
        if location.removeprefix("s3://").count("/") < 1:
            raise CheckpointError(f"{uri}: a bucket, not a checkpoint prefix", "name the prefix: s3://bucket/path/to/model")
        if remote:
            fs, root = open_fs(location, storage_options or {})
            if not fs.exists(f"{root}/config.json"):
                raise CheckpointError(f"{uri}: no config.json under this prefix", "check the bucket and prefix")


def read_card(uri: str, storage_options: dict[str, Any] | None = None, limit: int = 1 << 16) -> str | None:
    """The start (`limit` characters) of a checkpoint's model card, README.md, read from the source
    (it is not part of the fetched checkpoint); None if it has none."""
    scheme, location = _split(uri)
    if scheme == "file":
        card = Path(location) / "README.md"
        if not card.is_file():
            return None
        with open(card, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    if scheme == "s3":
        fs, root = open_fs(location, storage_options or {})
        try:
            with fs.open(f"{root}/README.md", "rb") as f:
                return f.read(limit).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, commit = resolve_hf(location, uri)
    try:
        path = hf_hub_download(repo, "README.md", revision=commit)
    except EntryNotFoundError:
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(limit)


def download(uri: str, cache_dir: str | Path | None = None, storage_options: dict[str, Any] | None = None) -> LocalCheckpoint:
    """Fetch `uri` into the cache (or find it there) and return its verified local copy."""
    cache = Path(cache_dir or default_cache_dir())
    scheme, location = _split(uri)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=_mkdir(cache / "checkpoints")))
    try:
        if scheme == "file":
            _fetch_local(Path(location), staging, uri)
        elif scheme == "s3":
            _fetch_s3(location, staging, storage_options or {}, uri)
        else:
            repo, commit = resolve_hf(location, uri)
            uri = f"hf://{repo}@{commit}"  # recorded as the commit it was, whatever branch it was named by
            _fetch_hf(f"{repo}@{commit}", staging, uri)
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(staging.iterdir())}
        if not any(n.endswith(".safetensors") for n in files):
            raise CheckpointError(
                f"{uri}: no *.safetensors files found",
                "expertbits reads safetensors only (no pickle); export with model.save_pretrained(dir)",
            )
        try:  # every header and the config checked before anything enters the cache
            Checkpoint.open(staging).close()
        except CheckpointError as e:  # named as the user knows the file, not by the staging copy
            raise CheckpointError(e.problem.replace(str(staging), uri.rstrip("/")), e.fix) from e
        digest = hashlib.sha256("".join(f"{n} {f['sha256']}\n" for n, f in files.items()).encode()).hexdigest()
        (staging / MANIFEST).write_text(json.dumps({"uri": uri, "digest": digest, "files": files}, indent=2, sort_keys=True))
        final = cache / "checkpoints" / digest
        if final.exists() and verify(final):
            shutil.rmtree(staging)
        else:
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)  # atomic: a reader never sees a half-filled entry
        remember_source(final, uri)
        return LocalCheckpoint(uri=uri, path=final, digest=digest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def verify(path: Path) -> bool:
    """True if every file listed in the entry's manifest is present with its recorded sha256.

    A file is hashed once per process, and again only if its size, modification time or inode
    changed since: a cache entry is trusted for its bytes, never for a marker file."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        return all(_sha256(path / n) == f["sha256"] for n, f in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


_HASHED: dict[str, tuple[tuple[int, int, int], str]] = {}  # path -> (size, mtime, inode) when hashed, sha256


def _sha256(path: Path) -> str:
    st = path.stat()
    sig = (st.st_size, st.st_mtime_ns, st.st_ino)
    known = _HASHED.get(str(path))
    if known is None or known[0] != sig:
        known = _HASHED[str(path)] = (sig, sha256_file(path))
    return known[1]


def ensure_local(uri: str, digest: str, cache_dir: str | Path | None = None, storage_options=None) -> Path:
    """The cached copy of a checkpoint, fetched again if the cache was cleared or damaged since
    (every file re-hashed against the entry's manifest); digest must match."""
    path = Path(cache_dir or default_cache_dir()) / "checkpoints" / digest
    if verify(path):
        remember_source(path, uri)
        return path
    fresh = download(uri, cache_dir, storage_options)
    if fresh.digest != digest:
        raise CheckpointError(
            f"{uri} changed since it was cached (digest {fresh.digest[:12]} != {digest[:12]})",
            "rerun the flow so every stage sees the new checkpoint",
        )
    return fresh.path


def file_digests(path: Path) -> dict[str, str]:
    """name -> sha256 of a cache entry's files, from its manifest."""
    return {n: f["sha256"] for n, f in json.loads((Path(path) / MANIFEST).read_text())["files"].items()}


INDEX = "model.safetensors.index.json"
HEADER = ".header.json"  # a shard not fetched: its safetensors header only, as JSON (read by reader.py)


def ensure_part(uri: str, digest: str, files: dict[str, str], wanted_files: Callable[[Path], list[str]],
                cache_dir: str | Path | None = None, storage_options=None) -> Path:
    """A cache entry holding only the shards `wanted_files(folder)` names, for a worker that works
    on some layers: the full entry if this machine has it, else `<cache>/partial/<digest>/` with
    the config, the index and tokenizer files, every shard's header alone (`<shard>.header.json`,
    read with two small reads, so `Checkpoint.open` knows the whole layout) and the wanted shards
    (each verified against `files`)."""
    cache = Path(cache_dir or default_cache_dir())
    full = cache / "checkpoints" / digest
    if verify(full):
        remember_source(full, uri)
        return full
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    if not files or INDEX not in files or len(shards) < 2:
        return ensure_local(uri, digest, cache_dir, storage_options)  # nothing to leave out
    part = _mkdir(cache / "partial" / digest)
    scheme, location = _split(uri)
    if scheme == "hf":
        return ensure_local(uri, digest, cache_dir, storage_options)  # the hub's own cache fetches whole files
    _fetch_verified(scheme, location, storage_options, part, [n for n in files if not n.endswith(".safetensors")],
                    files, uri)
    # headers are checked against the index (itself verified): the layout a worker sees is the download's
    weight_map = json.loads((part / INDEX).read_text())["weight_map"]
    for name in shards:
        stub = part / (name + HEADER)
        if not (part / name).is_file() and not stub.is_file():
            header = _remote_header(scheme, location, storage_options, name, uri)
            if set(header) - {"__metadata__"} != {k for k, f in weight_map.items() if f == name}:
                raise CheckpointError(f"{uri}: {name}'s tensors differ from what {INDEX} lists for it",
                                      "the checkpoint changed since it was downloaded, or its index is wrong; rerun the flow")
            _write_atomic(stub, json.dumps(header))
    wanted = sorted(wanted_files(part))
    unknown = [n for n in wanted if n not in files]
    if unknown:
        raise CheckpointError(f"{uri}: the layer needs {unknown}, which the download did not record",
                              "the checkpoint changed since it was downloaded; rerun the flow")
    _fetch_verified(scheme, location, storage_options, part, wanted, files, uri)
    remember_source(part, uri)
    return part


def _fetch_verified(scheme: str, location: str, storage_options, part: Path, names: list[str], files: dict[str, str],
                    uri: str) -> None:
    for name in names:
        if (part / name).is_file():
            if _sha256(part / name) == files[name]:
                continue
            (part / name).unlink()  # damaged since it was fetched: fetched again
        tmp = part / f".{name}.incoming-{uuid.uuid4().hex}"
        try:
            if scheme == "file":
                shutil.copyfile(Path(location) / name, tmp)
            else:
                fs, root = open_fs(location, storage_options or {})
                fs.get_file(f"{root}/{name}", str(tmp))
            digest = sha256_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if digest != files[name]:
            tmp.unlink()
            raise CheckpointError(f"{uri}: {name} changed since the checkpoint was downloaded (sha256 differs)",
                                  "rerun the flow so every stage sees the new checkpoint")
        tmp.rename(part / name)  # atomic: a reader sees a whole, verified file or none


def _remote_header(scheme: str, location: str, storage_options, name: str, uri: str) -> dict:
    """A safetensors file's header (8-byte little-endian length, then JSON), read without its data
    and checked as a local file's is."""
    fs, root = (None, location) if scheme == "file" else open_fs(location, storage_options or {})
    path = f"{root}/{name}"
    size = Path(path).stat().st_size if fs is None else fs.size(path)
    with (open(path, "rb") if fs is None else fs.open(path, "rb", block_size=1 << 16)) as f:
        return read_safetensors_header(f, size, f"{uri.rstrip('/')}/{name}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.incoming-{uuid.uuid4().hex}")
    try:
        tmp.write_text(text)
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _fetch_local(src: Path, dst: Path, uri: str) -> None:
    if not src.is_dir():
        raise CheckpointError(f"{uri}: {src} is not a folder", "point at a checkpoint folder holding config.json and *.safetensors")
    roots = [src.resolve()]
    if roots[0].parent.name == "snapshots" and roots[0].parent.parent.name.startswith("models--"):
        roots.append(roots[0].parent.parent / "blobs")  # a hub cache snapshot links every file into its repo's blobs/
    for p in sorted(src.iterdir()):
        if p.is_file() and wanted(p.name):
            if not any(p.resolve().is_relative_to(r) for r in roots):  # a link out of the folder: not the checkpoint's
                raise CheckpointError(f"{p}: a symlink to {p.resolve()}, outside {src}",
                                      "copy the file into the checkpoint folder (links within it are fine)")
            shutil.copyfile(p, dst / p.name)


def _fetch_s3(location: str, dst: Path, storage_options: dict[str, Any], uri: str) -> None:
    fs, root = open_fs(location, storage_options)
    fs.invalidate_cache(root)
    names = [k for k in fs.find(root) if wanted(k.rsplit("/", 1)[-1]) and k[len(root):].count("/") == 1]
    if not names:
        raise CheckpointError(f"{uri}: no checkpoint files under this prefix", "check the bucket and prefix")
    for key in names:
        fs.get_file(key, str(dst / key.rsplit("/", 1)[-1]))


COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_hf(location: str, uri: str) -> tuple[str, str]:
    """(repo, commit sha) of `org/name[@revision]`: a commit as given, a branch or tag (or none:
    the default branch) resolved now (on the hub; offline, from the local hub cache's refs), so a
    cached copy is only reused while the branch still points at the same commit. A repo or
    revision that does not exist is a CheckpointError; a network failure propagates (retried)."""
    repo, _, revision = location.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{uri}: expected hf://org/name[@revision]", "e.g. hf://mistralai/Mixtral-8x7B-v0.1@<commit sha>")
    if COMMIT.fullmatch(revision):
        return repo, revision
    import huggingface_hub.constants as hfc
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    fix = "check the name and your access, or pin a commit: hf://org/name@<40-hex commit sha>"
    if any(part in ("", ".", "..") for part in repo.split("/") + (revision.split("/") if revision else [])):
        raise CheckpointError(f"{uri}: '.', '..' or empty segments in the repo or revision", fix)
    if hfc.HF_HUB_OFFLINE:
        refs = Path(hfc.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs"
        ref = refs / (revision or "main")
        if not ref.resolve().is_relative_to(refs.resolve()) or not ref.is_file():
            raise CheckpointError(f"{uri}: offline (HF_HUB_OFFLINE) and the local hub cache has no ref {ref}", fix)
        sha = ref.read_text().strip()
    else:
        import httpx2
        from huggingface_hub.errors import HFValidationError

        try:
            sha = HfApi().model_info(repo, revision=revision or None).sha
        except HFValidationError as e:
            raise CheckpointError(f"{uri}: not a valid repo id or revision ({e})", fix) from e
        except httpx2.TransportError as e:  # unreachable, timed out: transient, so an OSError (retried)
            raise ConnectionError(f"{uri}: the hub did not answer ({type(e).__name__}: {e})") from e
        except HfHubHTTPError as e:
            status = e.response.status_code
            if status >= 500 or status in (408, 429):
                raise  # the hub, busy or failing: an OSError, retried
            raise CheckpointError(f"{uri}: cannot resolve {revision or 'the default branch'} of {repo} to a commit "
                                  f"(HTTP {status})", fix) from e
    if not isinstance(sha, str) or not COMMIT.fullmatch(sha):
        raise CheckpointError(f"{uri}: {'the local ref' if hfc.HF_HUB_OFFLINE else 'the hub'} does not hold a commit "
                              f"sha for {repo}", fix)
    return repo, sha


def pin(uri: str) -> str:
    """`uri` naming fixed contents: an hf:// branch or tag becomes hf://org/name@<commit>, resolved
    once, so the cache key and the download see the same commit; other URIs are returned as given."""
    if not uri.startswith("hf://"):
        return uri
    repo, commit = resolve_hf(uri.removeprefix("hf://"), uri)
    return f"hf://{repo}@{commit}"


def _fetch_hf(location: str, dst: Path, uri: str) -> None:
    from huggingface_hub import snapshot_download

    repo, commit = resolve_hf(location, uri)
    snapshot = Path(snapshot_download(repo, revision=commit, allow_patterns=list(PATTERNS)))
    for p in sorted(snapshot.iterdir()):
        if p.is_file() and wanted(p.name):
            shutil.copyfile(p, dst / p.name)
