"""Which checkpoint Λ compares a fine-tune with: the one the user names, the base model the
checkpoint declares, or none.

    given      --reference URI (or the watch's `references` for the checkpoint's prefix)
    declared   `base_model` in the checkpoint's model card (README.md YAML front matter, as the
               Hugging Face hub writes it) or in its config.json, when it can be fetched
    none       --reference none, or nothing declared, or the declared base cannot be fetched:
               Λ is then the final router norm (the paper's proxy), and the run says why

A declared base is resolved like any other source: a URI as written (zoo://, hf://, s3://,
file://), a hub id `org/name` as hf://org/name, and a path starting with ./ or ../ relative to
the checkpoint's own location (a sibling folder, prefix or zoo variant). A declaration that
cannot be resolved or fetched is reported, never an error: a checkpoint is quantized without a
reference rather than not at all. A reference the user names must be fetchable (an error
otherwise), and any reference whose routers differ from the checkpoint's is an error
(`check`), since Λ would compare unrelated rows.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path

from ..errors import CheckpointError
from ..records import ReferenceChoice
from .adapters import detect
from .reader import Checkpoint

NONE = "none"  # --reference none: no reference even if the checkpoint declares one
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CARD_LIMIT = 1 << 16  # the front matter is at the top of the card; a huge card is not read whole


def declared_base(path: Path) -> tuple[str, str] | None:
    """(value, where) of the base model a checkpoint folder declares, or None."""
    card = path / "README.md"
    if card.is_file():
        with open(card, encoding="utf-8", errors="replace") as f:
            value = front_matter_base(f.read(CARD_LIMIT))
        if value:
            return value, "README.md"
    try:
        value = json.loads((path / "config.json").read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return (value, "config.json") if isinstance(value, str) and value.strip() else None


def front_matter_base(text: str) -> str | None:
    """`base_model` of a model card's YAML front matter (`base_model: x`, or a one-item list).

    Read by hand rather than with a YAML library: the key is one scalar or list, and a card is
    untrusted input (no anchors, tags or other YAML machinery is needed to read it)."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    values: list[str] | None = None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if values is not None:
            item = re.fullmatch(r"\s+-\s+(.+)", line)
            if item:
                values.append(_scalar(item.group(1)))
                continue
            if line.strip() == "" or line.startswith((" ", "\t")):
                continue
            break
        key = re.fullmatch(r"base_model\s*:\s*(.*)", line)
        if key:
            rest = key.group(1).strip()
            if rest.startswith("[") and rest.endswith("]"):
                values = [_scalar(v) for v in rest[1:-1].split(",") if v.strip()]
                break
            if rest and not rest.startswith("#"):
                values = [_scalar(rest)]
                break
            values = []
    else:
        return None
    if not values:
        return None
    return values[0] if len(values) == 1 else "\n".join(values)  # several: a merge, reported by `resolve`


def _scalar(text: str) -> str:
    text = text.split(" #", 1)[0].strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def resolve(value: str, checkpoint_uri: str) -> str:
    """The URI a declared base names; ValueError saying why when it names none."""
    if "\n" in value:
        raise ValueError(f"several base models are declared ({', '.join(value.splitlines())}): a merge has no one base")
    if "://" in value:
        return value
    if value.startswith(("./", "../")):
        scheme, sep, location = checkpoint_uri.partition("://")
        if not sep:  # a plain folder
            return str((Path(checkpoint_uri).expanduser() / value).resolve())
        if scheme == "hf":
            raise ValueError(f"a relative path ({value}) in a hub repository names no other repository")
        joined = posixpath.normpath(posixpath.join(location.rstrip("/"), value))
        if scheme in ("s3", "zoo") and (joined.startswith("..") or "/" not in joined.strip("/")):
            raise ValueError(f"{value} leaves the {scheme}:// bucket or family of {checkpoint_uri}")
        return f"{scheme}://{joined}"
    if value.startswith(("/", "~")):
        if "://" in checkpoint_uri and not checkpoint_uri.startswith("file://"):
            raise ValueError(f"a local path ({value}) declared by a remote checkpoint is not followed")
        return str(Path(value).expanduser())
    if HUB_ID.fullmatch(value):
        return f"hf://{value}"
    raise ValueError(f"{value!r} is neither a URI, a hub id (org/name) nor a path starting with ./ or ../")


def choose(checkpoint_uri: str, path: Path, given: str | None, storage_options: dict) -> ReferenceChoice:
    """The reference for the checkpoint at `path` (its cached copy), fetched from `checkpoint_uri`."""
    from . import fetch

    if given and given.strip().lower() == NONE:
        return ReferenceChoice(uri=None, source="none-given", note="--reference none: Λ is the final router norm")
    if given:
        return ReferenceChoice(uri=fetch.pin(given), source="given", note=f"Λ against {given}, as given")
    declared = declared_base(path)
    if declared is None:
        return ReferenceChoice(uri=None, source="none", note=(
            f"{checkpoint_uri} declares no base model (base_model in README.md or config.json) and no --reference was "
            "given: Λ is the final router norm. Name the checkpoint it was fine-tuned from with --reference for the "
            "router-norm change"))
    value, where = declared
    try:
        uri = resolve(value, checkpoint_uri)
        fetch.check_source(uri, storage_options, remote=True)
        uri = fetch.pin(uri)
    except Exception as e:  # anything, network failures included: a declaration is a hint, not an order
        reason = e.problem if isinstance(e, CheckpointError) else str(e) or type(e).__name__
        return ReferenceChoice(uri=None, source="none", declared=value, note=(
            f"{checkpoint_uri} declares base_model {value!r} in {where}, which cannot be fetched ({reason}): Λ is the "
            "final router norm. Give --reference to name a copy of it, or --reference none to silence this"))
    return ReferenceChoice(uri=uri, source=f"declared in {where}", declared=value,
                           note=f"Λ against {uri}, the base_model {checkpoint_uri} declares in {where}")


def _shape(shape) -> str:
    return "absent" if shape is None else "×".join(map(str, shape))


def check(checkpoint_uri: str, ckpt_path: Path, choice: ReferenceChoice, ref_path: Path) -> None:
    """The reference has the checkpoint's routers, shape for shape; otherwise a CheckpointError
    that says where the reference came from and what to do."""
    with Checkpoint.open(ckpt_path) as ft, Checkpoint.open(ref_path) as ref:
        ours = {layer.layer: ft.tensors[layer.router_key].shape for layer in detect(ft).layers}
        try:
            theirs = {layer.layer: ref.tensors[layer.router_key].shape for layer in detect(ref).layers}
        except (CheckpointError, KeyError) as e:
            theirs, why = {}, getattr(e, "problem", f"no tensor {e}")
        else:
            why = None
    if ours == theirs:
        return
    if why is None:
        diff = [(k, ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        layer, a, b = diff[0]
        why = (f"layer {layer}'s router is {_shape(b)} in the reference, {_shape(a)} in the checkpoint "
               f"({len(diff)} of {len(set(ours) | set(theirs))} MoE layers differ)")
    where = ("--reference" if choice.source == "given" else
             f"the base_model {choice.declared!r} {checkpoint_uri} declares ({choice.source})")
    raise CheckpointError(
        f"reference {choice.uri} ({where}) does not match checkpoint {checkpoint_uri}: {why}",
        "name the checkpoint this model was fine-tuned from with --reference, or give --reference none to use the "
        "final router norm")
