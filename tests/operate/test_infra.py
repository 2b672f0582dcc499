"""infra/: prefect.yaml declares the deployments expertbits registers, and compose.yaml only names
commands our CLI has and credentials the example environment lists. (Docker does not run here.)"""

import re
import shlex
from pathlib import Path

import yaml

from expertbits.flows import deployments
from expertbits.flows.cli import build_parser

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_prefect_yaml_matches_the_deployments_expertbits_registers():
    from prefect.flows import load_flow_from_entrypoint

    declared = {d["name"]: d for d in yaml.safe_load((INFRA / "prefect.yaml").read_text())["deployments"]}
    built = {d.name: d for d in deployments.build(deployments.Settings(watch_prefixes=("s3://expertbits/incoming",)))}
    assert set(declared) == set(built) == set(deployments.NAMES)
    for name, d in declared.items():
        assert d["entrypoint"] == built[name].entrypoint
        assert load_flow_from_entrypoint(d["entrypoint"]).name == built[name].flow_name
        assert d["work_pool"]["name"] == "expertbits"
    (trigger,) = declared["requantize"]["triggers"]
    assert trigger["expect"] == ["expertbits.checkpoint.published"]
    assert trigger["parameters"] == deployments.TRIGGER_PARAMETERS and "watch" not in trigger["parameters"]
    assert declared["requantize"]["parameters"]["watch"] == declared["watch"]["parameters"]["params"]
    assert trigger["match"] == {"expertbits.watch": declared["watch"]["parameters"]["params"]["name"]}
    assert declared["quantize-nightly"]["schedules"][0]["cron"] == deployments.Settings().nightly_cron


def test_compose_names_only_our_commands_and_listed_credentials():
    text = (INFRA / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "worker", "gpu-worker", "dask-scheduler", "dask-worker",
            "deploy"} <= set(services)
    commands = [s["command"] for s in services.values() if isinstance(s.get("command"), str)]
    ours = [m for c in commands for m in re.findall(r'(?:^|&&|")\s*expertbits\s+([^"&]+)', " ".join(c.split()))]
    assert ours
    for command in ours:
        build_parser().parse_args(shlex.split(command))  # exits (fails the test) on an unknown command or option
    example = (INFRA / "compose.env.example").read_text()
    for var in set(re.findall(r"(?<!\$)\$\{(\w+)\}", text)):
        assert re.search(rf"^{var}=", example, re.M), f"{var} is not in infra/compose.env.example"
    worker_images = {s.get("image") for n, s in services.items() if n in ("worker", "gpu-worker", "dask-worker", "deploy")}
    assert len(worker_images) == 1 and (INFRA / "Dockerfile").is_file()
    assert services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert services["gpu-worker"]["environment"]["EXPERTBITS_DASK"] == "local-cuda"  # one Dask worker per GPU
    # the Dask services are used: the worker's flow runs map their per-layer work onto them
    scheduler = services["dask-scheduler"]["command"].split("--port ")[1].split()[0]
    assert services["worker"]["environment"]["EXPERTBITS_DASK"] == f"tcp://dask-scheduler:{scheduler}"
    assert services["dask-worker"]["command"].split()[2] == f"tcp://dask-scheduler:{scheduler}"
    from expertbits.flows.scale import NO_MALLOC_TRIM

    assert NO_MALLOC_TRIM.items() <= services["dask-worker"]["environment"].items()
    assert not re.search(r"(?i)(secret|password|key)\s*[:=]\s*[^$\s{]", text), "a literal credential in compose.yaml"


LOOPBACK = ("127.0.0.1", "${EXPERTBITS_BIND:-127.0.0.1}")  # the opt-in variable defaults to loopback
AUTH = "${PREFECT_AUTH_STRING:?set PREFECT_AUTH_STRING in infra/.env}"


def open_doors(compose: dict) -> list[str]:
    """What a compose file leaves open: ports published on all interfaces (`4200:4200`, `4200`,
    `0.0.0.0:…`, an opt-in defaulting to anything but loopback), a Prefect server started without
    the required auth string, a client of it without the string."""
    problems = []
    for name, service in compose["services"].items():
        for port in map(str, service.get("ports", [])):
            host = port.rsplit(":", 2)[0] if port.count(":") >= 2 else None
            if host not in LOOPBACK:
                problems.append(f"{name} publishes {port!r} on all interfaces")
        env = service.get("environment") or {}
        command = str(service.get("command", ""))
        if "prefect server start" in command and env.get("PREFECT_SERVER_API_AUTH_STRING") != AUTH:
            problems.append(f"{name} starts the Prefect server without authentication")
        if "PREFECT_API_URL" in env and env.get("PREFECT_API_AUTH_STRING") != AUTH:
            problems.append(f"{name} talks to the Prefect API without the auth string")
    return problems


def test_compose_is_closed_by_default():
    """Every published port binds to loopback unless the operator opts in (EXPERTBITS_BIND); the
    Prefect server starts with an auth string compose requires, and every client sends it; the
    MinIO console, Postgres and the Dask scheduler are not published."""
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    assert open_doors(compose) == []
    published = {str(p).rsplit(":", 1)[-1] for s in compose["services"].values() for p in s.get("ports", [])}
    assert published == {"4200", "9000"}  # the API/UI and S3; never the console, Postgres or Dask
    clients = [n for n, s in compose["services"].items() if "PREFECT_API_URL" in (s.get("environment") or {})]
    assert {"worker", "gpu-worker", "dask-worker", "deploy"} <= set(clients)
    scheduler = compose["services"]["dask-scheduler"].get("environment") or {}
    assert not {"AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING"} & set(scheduler)  # it needs neither
    example = (INFRA / "compose.env.example").read_text()
    assert re.search(r"^PREFECT_AUTH_STRING=$", example, re.M)  # no known password: compose refuses to start
    assert re.search(r"^EXPERTBITS_BIND=127\.0\.0\.1$", example, re.M)


def test_the_compose_check_catches_open_doors():
    """`open_doors` on the mistakes it exists for, so that its silence above means something."""
    server = {"command": "prefect server start --host 0.0.0.0", "environment": {"PREFECT_SERVER_API_AUTH_STRING": AUTH}}
    for port in ("4200:4200", "4200", "0.0.0.0:4200:4200", "${EXPERTBITS_BIND:-0.0.0.0}:4200:4200", "${X}:4200:4200"):
        assert open_doors({"services": {"s": dict(server, ports=[port])}}) == [f"s publishes {port!r} on all interfaces"]
    assert open_doors({"services": {"s": dict(server, ports=["127.0.0.1:4200:4200"])}}) == []
    assert open_doors({"services": {"s": {"command": "prefect server start", "environment": {}}}}) == [
        "s starts the Prefect server without authentication"]
    assert open_doors({"services": {"w": {"command": "prefect worker start", "environment": {"PREFECT_API_URL": "x"}}}}) == [
        "w talks to the Prefect API without the auth string"]


def test_only_the_prefect_apis_own_401_is_called_a_missing_auth_string():
    """A 401 from the configured Prefect API (also when another error was raised from it) gets the
    auth-string fix; a 401 from anyone else (the hub for a gated model) or another status does not."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from expertbits.flows.cli import _refused

    def error(url: str, status: int, kind=PrefectHTTPStatusError):
        request = httpx.Request("POST", url)
        return kind(f"{status}", request=request, response=httpx.Response(status, request=request))

    api = "http://127.0.0.1:4200/api"
    with temporary_settings({PREFECT_API_URL: api}):
        message = _refused(error(f"{api}/deployments/filter", 401))
        assert message.startswith(f"expertbits: {api} refused the request (401): this process sends no auth string")
        assert "fix: set PREFECT_API_AUTH_STRING" in message
        try:
            try:
                raise error(f"{api}/flows/", 401)
            except PrefectHTTPStatusError as inner:
                raise RuntimeError("deploy failed") from inner
        except RuntimeError as outer:
            assert _refused(outer) is not None
        assert _refused(error("https://huggingface.co/api/models/org/gated", 401, httpx.HTTPStatusError)) is None
        assert _refused(error("https://huggingface.co/api/models/org/gated", 401)) is None  # not our API
        assert _refused(error(f"{api}/deployments/filter", 404)) is None
        assert _refused(ValueError("x")) is None
    with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: "a:b"}):
        assert "sends a wrong auth string" in _refused(error(f"{api}/flows/", 401))
