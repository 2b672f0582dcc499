"""The model zoo: checkpoints and text that ship with expertbits, named by `zoo://` URIs.

`zoo://micro-mixtral/finetuned` is a checkpoint folder under `models/`; `zoo://text/code-heldout`
is a text file under `text/`. Nothing here is downloaded: the hub is not reachable everywhere
expertbits runs, so the project brings its own models.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent


def text_path(name: str) -> Path:
    path = ROOT / "text" / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled text {name!r}; available: {available_texts()}")
    return path


def available_texts() -> list[str]:
    return sorted(p.stem for p in (ROOT / "text").glob("*.txt"))


def available_models() -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in (ROOT / "models").glob("*/*") if (p / "config.json").is_file())


def resolve(uri: str) -> Path:
    """Local path of a `zoo://family/variant` checkpoint or `zoo://text/name` text."""
    name = uri.removeprefix("zoo://").strip("/")
    if name.startswith("text/"):
        return text_path(name.removeprefix("text/"))
    path = ROOT / "models" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no zoo model {name!r}; available: {available_models()}")
    return path
