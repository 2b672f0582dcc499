"""Event-driven requantization: a watcher that announces checkpoints, and the flow their events start.

    watch      scan the watched prefixes → claim each new (uri, digest) → emit
               `expertbits.checkpoint.published`
    requantize (started by a deployment trigger on that event) check the URI is watched → quantize

The open-source Prefect server has no webhooks, so the watcher is a scheduled sensor flow. What
it has announced is kept durably in the Prefect API as one Variable per (uri, digest), created
atomically: the same bytes are never announced twice, even by two watchers at once, and a changed
revision or content is a new claim. A checkpoint still being uploaded is not announced until it is
complete (`tasks/checkpoints/watch.py`). Every prefix is scanned before anything is emitted, so an unreachable
store fails the run with nothing announced.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from prefect import flow, tags, task
from prefect.logging import get_run_logger

from expertbits.tasks.checkpoints.watch import Found, scan, under
from expertbits.tasks.records import RunManifest

from .params import WatchParams
from .quantize import quantize_moe

EVENT = "expertbits.checkpoint.published"


def seen_variable(uri: str, digest: str) -> str:
    """The Prefect Variable that marks (uri, digest) as announced."""
    return "expertbits-seen-" + hashlib.sha256(f"{uri}\n{digest}".encode()).hexdigest()[:40]


@task(name="scan-prefixes")
def scan_prefixes(prefixes: list[str], storage_options: dict) -> list[dict]:
    """Every checkpoint under every prefix; a prefix that cannot be listed fails the run."""
    logger = get_run_logger()
    found = [f for prefix in prefixes for f in scan(prefix, storage_options)]
    for f in found:
        if f.incomplete:
            logger.info(f"not announced yet: {f.uri}: {f.incomplete}")
    return [f.__dict__ for f in found]


def claim(uri: str, digest: str, revision: str | None, watch: str) -> bool:
    """Atomically record (uri, digest) as announced; False if it already was (by anyone)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    value = {"uri": uri, "digest": digest, "revision": revision, "watch": watch,
             "announced": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with get_client(sync_client=True) as client:
        try:
            client.create_variable(VariableCreate(name=seen_variable(uri, digest), value=value,
                                                  tags=["expertbits", f"watch:{watch}"]))
        except ObjectAlreadyExists:
            return False
    return True


def unclaim(uri: str, digest: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.delete_variable_by_name(seen_variable(uri, digest))


@task(name="announce")
def announce(found: list[dict], params: WatchParams) -> list[dict]:
    """Claim and emit one event per complete checkpoint not announced before."""
    from prefect.events import emit_event

    logger = get_run_logger()
    announced = []
    for f in (Found(**d) for d in found):
        if f.incomplete or not claim(f.uri, f.digest, f.revision, params.name):
            continue
        try:
            event = emit_event(
                event=EVENT,
                resource={"prefect.resource.id": f"expertbits.checkpoint.{hashlib.sha256(f.uri.encode()).hexdigest()[:16]}",
                          "prefect.resource.name": f.uri, "expertbits.watch": params.name},
                payload={"uri": f.uri, "revision": f.revision, "digest": f.digest})
            if event is None:
                raise RuntimeError("Prefect events are disabled in this process (emit_event returned nothing)")
        except BaseException:
            unclaim(f.uri, f.digest)  # never leave a claim without its event
            raise
        logger.info(f"announced {f.uri} (digest {f.digest[:12]}): event {event.id}")
        announced.append({"uri": f.uri, "digest": f.digest, "revision": f.revision, "event_id": str(event.id)})
    return announced


@flow(name="expertbits-watch", log_prints=True)
def watch_checkpoints(params: WatchParams) -> list[dict]:
    """Announce every new or changed checkpoint under the watched prefixes."""
    found = scan_prefixes(params.prefixes, params.storage_options)
    return announce(found, params)


@flow(name="expertbits-requantize", log_prints=True)
def requantize(uri: str, digest: str, watch: WatchParams, revision: str | None = None,
               event_id: str | None = None) -> RunManifest | None:
    """Quantize a checkpoint a watcher announced, with the watch's configuration (fixed when the
    deployment was made, never taken from the event)."""
    logger = get_run_logger()
    if not under(uri, watch.prefixes):
        logger.warning(f"ignored event {event_id}: {uri} is outside the watched prefixes {watch.prefixes}")
        return None
    logger.info(f"requantizing {uri} (digest {digest[:12]}, revision {revision}) for event {event_id}")
    with tags("expertbits-requantize", f"event:{event_id}"):
        return quantize_moe(watch.quantize_params(uri, event_id))
