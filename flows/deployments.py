"""The deployments platform teams run: forms in the UI, a schedule, a watcher and its trigger.

    quantize       the quantize flow; its UI form is QuantizeParams (descriptions and constraints)
    league         the league flow; its form is LeagueParams
    quantize-nightly  the quantize flow on a cron schedule for one configured checkpoint
    watch          the watcher sensor on an interval, over the configured prefixes
    requantize     started by a trigger on `expertbits.checkpoint.published`, with the event's URI,
                   digest, revision and id and the watch's configuration from its payload

`expertbits deploy` registers them on the current Prefect API against a process work pool (the
same definitions as `infra/prefect.yaml`), `expertbits serve-deployments` serves them from one process.
Entry points are module paths (`expertbits.flows.quantize.quantize_moe`), so a worker needs
expertbits installed and nothing else. Credentials never appear here: workers read them from
their environment (AWS_*, HF_TOKEN) or a Prefect secret block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from .league import league_table
from .params import LeagueParams, QuantizeParams, WatchParams
from .quantize import quantize_moe
from .watch import EVENT, requantize, watch_checkpoints

NAMES = ("quantize", "league", "quantize-nightly", "watch", "requantize")  # the last two only with watch prefixes
# The trigger's parameters, rendered by the server from each event: a single {{ }} keeps its JSON
# type; the event id goes through `string` because the server's tojson cannot encode a UUID. Only
# what identifies the checkpoint comes from the event: the watch (prefixes, store, quantize
# settings) is fixed at deploy time, so an event cannot widen what is watched or where runs go.
TRIGGER_PARAMETERS = {"uri": "{{ event.payload.uri }}", "digest": "{{ event.payload.digest }}",
                      "revision": "{{ event.payload.revision }}", "event_id": "{{ event.id | string }}"}


@dataclass(frozen=True)
class Settings:
    """What a platform team configures; everything else is each run's form."""

    store: str = "expertbits-store"
    storage_options: dict = field(default_factory=dict)  # non-secret only (endpoint_url, ...)
    watch_prefixes: tuple[str, ...] = ()
    watch_interval_s: int = 300
    watch_quantize: dict = field(default_factory=dict)  # QuantizeParams overrides for triggered runs
    watch_references: dict = field(default_factory=dict)  # prefix -> the reference of checkpoints under it
    nightly_cron: str = "0 3 * * *"
    nightly_checkpoint: str = QuantizeParams.model_fields["checkpoint"].default
    timezone: str = "UTC"


def build(settings: Settings = Settings()) -> list:
    """The RunnerDeployments, in NAMES order (the watcher only when prefixes are configured)."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    common = dict(entrypoint_type=EntrypointType.MODULE_PATH, tags=["expertbits"])
    io = dict(store=settings.store, storage_options=settings.storage_options)
    out = [
        quantize_moe.to_deployment(name="quantize", parameters={"params": QuantizeParams.form(**io)},
                                   description="Quantize a MoE checkpoint with per-expert bit-widths", **common),
        league_table.to_deployment(name="league", parameters={"params": LeagueParams(**io).model_dump(mode="json")},
                                   description="Compare allocators on one checkpoint pair", **common),
        quantize_moe.to_deployment(
            name="quantize-nightly", schedule=Cron(settings.nightly_cron, timezone=settings.timezone),
            parameters={"params": QuantizeParams.form(checkpoint=settings.nightly_checkpoint, **io)},
            description=f"Requantize {settings.nightly_checkpoint} on a schedule", **common),
    ]
    if settings.watch_prefixes:
        watch = WatchParams(prefixes=list(settings.watch_prefixes), quantize=settings.watch_quantize,
                            references=settings.watch_references, **io)
        out.append(watch_checkpoints.to_deployment(
            name="watch", interval=timedelta(seconds=settings.watch_interval_s),
            parameters={"params": watch.model_dump(mode="json")},
            description=f"Announce new checkpoints under {', '.join(settings.watch_prefixes)}", **common))
        out.append(requantize.to_deployment(
            name="requantize", description=f"Quantize each checkpoint announced by {EVENT}",
            parameters={"watch": watch.model_dump(mode="json")},
            triggers=[DeploymentEventTrigger(name="on-checkpoint-published", expect={EVENT},
                                             match={"expertbits.watch": watch.name}, parameters=TRIGGER_PARAMETERS)],
            **common))
    return out


def deploy(settings: Settings, work_pool: str) -> list[str]:
    """Register every deployment on the current Prefect API for `work_pool`; returns their ids."""
    return [str(d.apply(work_pool_name=work_pool)) for d in build(settings)]


def serve(settings: Settings) -> None:
    """Serve every deployment from this process (no work pool needed); blocks."""
    from prefect import serve as prefect_serve

    prefect_serve(*build(settings))
