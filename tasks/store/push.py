"""Publish a run's quantized folder to the Hugging Face hub: `expertbits push RUN hf://org/name[@branch]`.

The run is re-hashed against its manifest first (verify.py): a damaged run is refused before any
request is made. Then, through huggingface_hub: the repository is created if it does not exist
(private with `private`), the branch too, and the `quantization/` folder, model card included, is
uploaded as one commit. The commit is recorded in the store beside the run,

    pushes/<run-id>/<UTC time>-<commit>.json    {run_id, target, repo_id, branch, commit, commit_url, ...}

one object per push, never rewritten, so the catalog (catalog.py) lists where each run went without
a shared database. The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`): never an
option, and written nowhere by expertbits.
"""

from __future__ import annotations

import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ExpertbitsError, StoreError
from .storage import Store
from .verify import verify_run

TARGET = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<branch>[^@\s]+))?/?$")
PUSHES = "pushes"


def parse_target(target: str) -> tuple[str, str | None]:
    """(repo id, branch or None) of `hf://org/name[@branch]`."""
    m = TARGET.match(target.strip())
    if not m:
        raise ExpertbitsError(f"{target}: not a hub target", "give hf://org/name, or hf://org/name@branch")
    return m.group("repo"), m.group("branch")


def _refused(e: Exception, repo_id: str) -> ExpertbitsError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if status in (401, 403):
        return ExpertbitsError(f"the hub refused the push to {repo_id} ({status}): {first}",
                               "log in with a token that may write there: set HF_TOKEN, or run `hf auth login`")
    return ExpertbitsError(f"the push to {repo_id} failed ({type(e).__name__}: {first})",
                           "check the repository name and your network, then push again: the folder is uploaded as "
                           "one commit, so it is either all there or not at all (a timeout can hide a commit that "
                           "landed: look at the repository; it or the branch may have been created already)")


def push(store: Store, run_id: str, target: str, private: bool = False) -> dict:
    """Push the run `runs/<run_id>` of `store` to `target`; returns the record of the push."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, branch = parse_target(target)
    prefix = f"runs/{run_id}"
    if not store.exists(f"{prefix}/manifest.json"):
        raise StoreError(f"{store.uri(prefix)}: no published run (no manifest.json)",
                         "`expertbits runs --store STORE` lists the runs")
    report = verify_run(store, prefix)
    if not report["ok"]:
        what = "; ".join(f"{kind}: {', '.join(report[kind][:5])}" for kind in ("changed", "missing", "extra") if report[kind])
        raise StoreError(f"{report['run']} differs from its manifest ({what}), so it is not pushed",
                         "rerun the flow to republish the run (every stage is cached), then push again")
    manifest = json.loads(store.read_bytes(f"{prefix}/manifest.json"))
    folder_rel = f"{prefix}/quantization"
    api = HfApi()
    with tempfile.TemporaryDirectory() as tmp:
        if store.is_local:
            folder = Path(store.uri(folder_rel))
        else:
            folder = Path(tmp) / "quantization"
            for rel in (r.split("/", 1)[1] for r in manifest["files"] if r.startswith("quantization/")):
                store.get_file(f"{folder_rel}/{rel}", folder / rel)
        try:
            api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")  # None: the owner's default
            visible = api.repo_info(repo_id, repo_type="model")
            if private and not visible.private:  # --private applies to a new repository only
                raise ExpertbitsError(f"{repo_id} exists and is public, and --private was asked for",
                                      "make the repository private on the hub first, or push without --private")
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=branch,
                                     commit_message=f"expertbits run {run_id}",
                                     commit_description=f"The quantization/ folder of expertbits run {run_id} "
                                                        f"({manifest['uri']}), verified against its manifest.")
        except ExpertbitsError:
            raise
        except (HfHubHTTPError, OSError) as e:
            raise _refused(e, repo_id) from e
        except ValueError as e:  # the hub's check of the card's metadata ("Invalid metadata in README.md")
            raise ExpertbitsError(f"the hub refused the model card of {run_id}: {e}",
                                  "report this (expertbits writes the card); nothing of the folder was committed") from e
        except Exception as e:  # the HTTP client's own errors (connection refused, timeouts) are not OSErrors
            if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
                raise  # a bug, not the network: its own traceback
            raise _refused(e, repo_id) from e
    now = datetime.now(timezone.utc)
    record = {"run_id": run_id, "target": target, "repo_id": repo_id, "branch": branch or "main",
              "commit": info.oid, "commit_url": info.commit_url, "private": bool(visible.private),
              "files": sum(1 for r in manifest["files"] if r.startswith("quantization/")),
              "pushed_at": now.isoformat(timespec="seconds")}
    store_rel = f"{PUSHES}/{run_id}/{now.strftime('%Y%m%dT%H%M%S%fZ')}-{info.oid[:12]}.json"
    try:
        store.write_bytes(store_rel, json.dumps(record, indent=2).encode())
    except Exception as e:  # the commit is on the hub: say which, whatever happened to the record
        raise StoreError(f"pushed {run_id} to {repo_id}@{record['branch']} as commit {info.oid} ({info.commit_url}), "
                         f"but its record could not be written to {store.uri(store_rel)} ({type(e).__name__}: {e})",
                         "the push itself succeeded; `expertbits runs` will not show it until you push again") from e
    return record


def pushes(store: Store, run_id: str) -> list[dict]:
    """Every recorded push of a run, oldest first."""
    out = []
    for rel in sorted(r for r in store.list(f"{PUSHES}/{run_id}") if r.endswith(".json")):
        out.append(json.loads(store.read_bytes(f"{PUSHES}/{run_id}/{rel}")))
    return out
