"""Which checkpoint Λ compares a fine-tune with: the one the user names, the base model the
checkpoint declares, or none.

    given      --reference URI (or the watch's --watch-reference for the checkpoint's prefix)
    declared   `base_model` in the checkpoint's model card (README.md YAML front matter, as the
               Hugging Face hub writes it) or in its config.json
    none       --reference none, or nothing declared, or the declared base cannot be used:
               Λ is then the final router norm (the paper's proxy), and the run says why

A declared base is resolved like any other source: a URI as written, a hub id `org/name` as
hf://org/name, and a path starting with ./ or ../ relative to the checkpoint's own location (a
sibling folder, prefix or zoo variant). A checkpoint is data, not an instruction: one that is not
on this machine may only name the hub, the bundled zoo or (from s3://) its own bucket, never a
local path or another bucket. A declaration that cannot be resolved, fetched or used (its routers
differ) is reported and the run goes on without a reference (stages/quantize_tasks.py,
`fetch_reference`); a reference the user names must be fetchable and match, or the run fails.
"""

from __future__ import annotations

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
_NULLS = {"", "null", "~", "none", "None", "Null", "NULL"}


def declared_base(card: str | None, config: dict) -> tuple[str, str] | None:
    """(value, where) of the base model a checkpoint declares in its card or config, or None."""
    value = front_matter_base(card) if card else None
    if value:
        return value, "README.md"
    value = config.get("base_model")
    return (value.strip(), "config.json") if isinstance(value, str) and value.strip() not in _NULLS else None


def front_matter_base(text: str) -> str | None:
    """`base_model` of a model card's YAML front matter: a scalar, a flow list `[a, b]` or a block
    list (`- a`, indented or not, as huggingface_hub writes it); several values are returned one
    per line (a merge, which `resolve` refuses).

    Read by hand rather than with a YAML library: the key is one scalar or list, and a card is
    untrusted input (no anchors, tags or other YAML machinery is needed to read it)."""
    lines = text.removeprefix("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    values: list[str] | None = None
    for line in lines[1:]:
        if line.strip() in ("---", "..."):
            break
        if values is not None:  # inside `base_model:`'s block list
            item = re.fullmatch(r"\s*-\s+(.+)", line)
            if item:
                values.append(_scalar(item.group(1)))
                continue
            if line.strip() == "" or line.lstrip().startswith("#"):
                continue
            break
        key = re.fullmatch(r"base_model\s*:(.*)", line)
        if key:
            rest = _scalar(key.group(1))
            if rest.startswith("[") and rest.endswith("]"):
                values = [_scalar(v) for v in rest[1:-1].split(",")]
                break
            if rest:
                values = [rest]
                break
            values = []
    else:
        if values is None:
            return None
    values = [v for v in (values or []) if v not in _NULLS]
    return "\n".join(values) or None


def _scalar(text: str) -> str:
    text = re.split(r"\s#", text, maxsplit=1)[0].strip()  # a comment after a space or a tab
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def resolve(value: str, checkpoint_uri: str) -> str:
    """The URI a declared base names; ValueError saying why when it names none, or names what a
    checkpoint from `checkpoint_uri` may not point at."""
    if "\n" in value:
        raise ValueError(f"several base models are declared ({', '.join(value.splitlines())}): a merge has no one base")
    scheme, sep, location = checkpoint_uri.partition("://")
    local = not sep or scheme == "file"
    if value.startswith(("./", "../")):
        if local:
            folder = Path(location if sep else checkpoint_uri).expanduser()
            return ("file://" if sep else "") + str((folder / value).resolve())
        if scheme == "hf":
            raise ValueError(f"a relative path ({value}) in a hub repository names no other repository")
        joined = posixpath.normpath(posixpath.join(location.rstrip("/"), value))
        uri = f"{scheme}://{joined}"
    elif "://" in value:
        uri = value
    elif HUB_ID.fullmatch(value):
        return f"hf://{value}"
    elif value.startswith(("/", "~")) and local:
        return str(Path(value).expanduser())
    elif value.startswith(("/", "~")):
        raise ValueError(f"a local path ({value}) declared by a checkpoint that is not on this machine is not followed")
    else:
        raise ValueError(f"{value!r} is neither a URI, a hub id (org/name) nor a path starting with ./ or ../")
    target = uri.partition("://")[0]
    if local or target in ("hf", "zoo") and not (scheme == "zoo" and target == "zoo" and
                                                   uri.removeprefix("zoo://").count("/") != 1):
        return uri
    if scheme == "s3" and target == "s3" and _bucket(uri) == _bucket(checkpoint_uri) and ".." not in uri.split("/"):
        return uri
    raise ValueError(f"{value} is not followed from {checkpoint_uri}: a checkpoint that is not on this machine may "
                     "name the hub, the bundled zoo or its own bucket only")


def _bucket(uri: str) -> str:
    return uri.removeprefix("s3://").split("/", 1)[0]


def choose(checkpoint_uri: str, config: dict, card: str | None, given: str | None,
           card_problem: str | None = None) -> ReferenceChoice:
    """The reference for a checkpoint (its config and card as read from `checkpoint_uri`)."""
    if given and given.strip().lower() == NONE:
        return ReferenceChoice(uri=None, source="none-given", reason="--reference none",
                               note="--reference none: Λ is the final router norm")
    if given:
        return ReferenceChoice(uri=given, source="given", reason="as given", note=f"Λ against {given}, as given")
    declared = declared_base(card, config)
    if declared is None:
        why = f"{checkpoint_uri} declares no base model (base_model in README.md or config.json)" + (
            f"; its model card could not be read ({card_problem})" if card_problem else "")
        return unusable(ReferenceChoice(uri=None, source="none", reason=why, note=""), why)
    value, where = declared
    try:
        uri = resolve(value, checkpoint_uri)
    except ValueError as e:
        return unusable(ReferenceChoice(uri=None, source="none", declared=value, reason="", note=""),
                        f"{checkpoint_uri} declares base_model {value!r} in {where}, which is not used: {e}")
    return ReferenceChoice(uri=uri, source=f"declared in {where}", declared=value, reason=f"declared in {where}",
                           note=f"Λ against {uri}, the base_model {checkpoint_uri} declares in {where}")


def unusable(choice: ReferenceChoice, why: str) -> ReferenceChoice:
    """No reference after all, saying why (a declared base that cannot be used)."""
    return choice.model_copy(update={
        "uri": None, "source": "none", "reason": why,
        "note": f"{why}: Λ is the final router norm. Name the checkpoint it was fine-tuned from with --reference "
                "(for a watched prefix: --watch-reference) for the router-norm change, or give --reference none"})


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
        "name the checkpoint this model was fine-tuned from with --reference (for a watched prefix: "
        "--watch-reference), or give --reference none to use the final router norm")
