"""Operating expertbits: deployments on a real `prefect server`, a real process worker and an S3
server (moto) on loopback. The UI's Run button, the watcher and its trigger, deduplication by
content, and the server's own schema enforcement, end to end."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
# In the environment of the server, the worker and every flow run it starts (where credentials
# belong): the tests below find it in nothing the deployments write.
SECRET = f"planted-{os.urandom(8).hex()}"
# The Prefect API's basic authentication, as compose sets it: the server asks for it, every client sends it.
AUTH = f"expertbits:auth-{os.urandom(8).hex()}"
SMALL = {"reference": None, "avg_bits": 2.5, "bit_widths": [2, 3], "group_size": 32, "eval_windows": 2,
         "calibration_windows": 2, "eval_seq_len": 64, "quantizer": "rtn"}  # per-layer Dask tasks: RTN


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


@contextlib.contextmanager
def prefect_server(home: Path, auth: str | None = None):
    """A real `prefect server start` on a free loopback port (asking for `auth`, if given), and the
    environment to reach it (sending `auth`)."""
    import httpx

    url = f"http://127.0.0.1:{_port()}/api"
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_API_URL=url, OMP_NUM_THREADS="1",
               EXPERTBITS_CACHE=str(home / "cache"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               AWS_SECRET_ACCESS_KEY=SECRET)
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    server_env = dict(env, PREFECT_SERVER_API_AUTH_STRING=auth) if auth else env
    env = dict(env, PREFECT_API_AUTH_STRING=auth) if auth else env
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               url.split(":")[-1][:-4]], env=server_env, stdout=open(home / "server.log", "w"),
                              stderr=subprocess.STDOUT)
    try:
        _until("prefect server health", lambda: _healthy(httpx, url), 120)
        yield url, env
    finally:
        _stop(server)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def platform(tmp_path_factory, s3_endpoint):
    """`prefect server start` asking for basic authentication (as compose runs it), a process work
    pool with `prefect worker start`, the deployments; this process sends the auth string too."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("platform")
    prefect = [sys.executable, "-m", "prefect"]
    with prefect_server(home, AUTH) as (url, env):
        subprocess.run([*prefect, "work-pool", "create", "expertbits-test", "--type", "process"], env=env, check=True,
                       capture_output=True)
        worker = subprocess.Popen([*prefect, "worker", "start", "--pool", "expertbits-test", "--limit", "2"],
                                  env=env, stdout=open(home / "worker.log", "w"), stderr=subprocess.STDOUT)
        try:
            with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: AUTH}):
                yield {"url": url, "home": home, "env": env}
        finally:
            _stop(worker)


def _healthy(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _runs(client, flow_name: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _finished(client, run_id):
    run = client.read_flow_run(run_id)
    return run if run.state and run.state.is_final() else None


def test_deployments_ui_run_watcher_trigger_dedup_and_schema(platform, s3, micro_pair, tmp_path):
    from prefect.client.orchestration import get_client

    from expertbits.flows import deployments
    from expertbits.tasks.store import catalog
    from expertbits.tasks.store.storage import Store

    fs, options = s3
    store, watched = f"s3://{fs.bucket}/store", f"s3://{fs.bucket}/incoming"
    started = time.monotonic()
    _locked(platform["url"])

    # 1. the deployments, from the project's own definition
    # checkpoints under m1/ have a known base; any other checkpoint is quantized without one
    settings = deployments.Settings(store=store, storage_options=options, watch_prefixes=(watched,),
                                    watch_quantize=SMALL, watch_references={f"{watched}/m1": f"s3://{fs.bucket}/models/base"})
    deployments.deploy(settings, "expertbits-test")
    with get_client(sync_client=True) as client:
        found = {d.name: d for d in client.read_deployments()}
        assert set(found) == set(deployments.NAMES)
        assert found["quantize"].enforce_parameter_schema
        schema = json.dumps(found["quantize"].parameter_openapi_schema)
        assert "Average bits per routed expert" in schema and "granularity" in schema
        assert "How each expert matrix is quantized: rtn, gptq" in schema and "gptq_min_tokens" in schema
        league_form = json.dumps(found["league"].parameter_openapi_schema)
        assert "Quantizers to compare (rtn, gptq)" in league_form

        # 2. a run created as the UI's Run button creates it, with form parameters
        base, ft = micro_pair
        fs.put(str(ft) + "/", f"{fs.bucket}/models/ft/", recursive=True)
        fs.put(str(base) + "/", f"{fs.bucket}/models/base/", recursive=True)
        form = dict(SMALL, checkpoint=f"s3://{fs.bucket}/models/ft", store=store, storage_options=options)
        run = client.create_flow_run_from_deployment(found["quantize"].id, parameters={"params": form})
        done = _until("the UI-started run", lambda: _finished(client, run.id), 240)
        assert done.state.is_completed(), done.state
        listed = catalog.list_runs(Store(store, options))
        assert list(listed.checkpoint) == [form["checkpoint"]]

        # 2b. the same deployment with the Dask job variable maps its per-layer work onto a local cluster
        spread = client.create_flow_run_from_deployment(found["quantize"].id, parameters={"params": dict(form, avg_bits=3.0)},
                                                        job_variables={"env": {"EXPERTBITS_DASK": "local:2"}})
        assert _until("the Dask run", lambda: _finished(client, spread.id), 240).state.is_completed()
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        names = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[spread.id])))}
        assert {"quantization-layers-[0]", "quantization-layers-[1]"} <= names, sorted(names)  # one task per layer

        # 3. checkpoints uploaded into the watched prefix are announced, and their runs complete: the
        # micro Mixtral under m1/ against the reference the watch maps m1/ to, and a Qwen2-MoE (another
        # family, size and tokenizer, no known reference) without one
        from support.archs import build

        fs.put(str(ft) + "/", f"{watched}/m1/", recursive=True)
        qwen = build("qwen2_moe", tmp_path / "qwen", tokenizer=ft)
        fs.put(str(qwen) + "/", f"{watched}/q1/", recursive=True)
        watch = client.create_flow_run_from_deployment(found["watch"].id)
        assert _until("the watcher", lambda: _finished(client, watch.id), 120).state.is_completed()
        triggered = _until("both triggered runs", lambda: (r := _runs(client, "expertbits-requantize")) and len(r) >= 2 and r,
                           90)
        ends = {r.parameters["uri"]: _until("a triggered run's end", lambda: _finished(client, r.id), 240) for r in triggered}
        assert set(ends) == {f"{watched}/m1", f"{watched}/q1"}
        assert all(e.state.is_completed() for e in ends.values()), {u: e.state for u, e in ends.items()}
        first = ends[f"{watched}/m1"]
        assert len(first.parameters["digest"]) == 64
        fs.invalidate_cache()
        summaries = [json.loads(fs.cat(f"{m}/manifest.json"))["summary"] for m in fs.ls(f"{fs.bucket}/store/runs")]
        by_checkpoint = {m["parameters"]["checkpoint"]: m for m in summaries}
        m1, q1 = by_checkpoint[f"{watched}/m1"], by_checkpoint[f"{watched}/q1"]
        assert (m1["reference"]["uri"], m1["reference"]["source"]) == (f"s3://{fs.bucket}/models/base", "given")
        assert m1["statistics"]["lambda_source"] == "norm-change"
        assert q1["reference"]["uri"] is None and q1["statistics"]["lambda_source"] == "final-norm-proxy"
        assert q1["statistics"]["model_type"] == "qwen2_moe"
        runs = catalog.list_runs(Store(store, options))
        mine = runs[runs.checkpoint == f"{watched}/m1"]
        assert len(mine) == 1 and mine.event_id.iloc[0] == first.parameters["event_id"], runs[["run_id", "checkpoint", "event_id"]].to_dict("records")
        child = [r for r in client.read_flow_runs() if r.parent_task_run_id and f"event:{mine.event_id.iloc[0]}" in r.tags]
        assert child, "the quantize run does not carry its event as a tag"

        # 4. the same bytes uploaded again start nothing; a new revision starts one run
        fs.put(str(ft) + "/", f"{watched}/m1/", recursive=True)
        again = client.create_flow_run_from_deployment(found["watch"].id)
        assert _until("the second watcher", lambda: _finished(client, again.id), 120).state.is_completed()
        shutil.copyfile(base / "model.safetensors", platform["home"] / "model.safetensors")
        fs.put(str(platform["home"] / "model.safetensors"), f"{watched}/m1/model.safetensors")
        third = client.create_flow_run_from_deployment(found["watch"].id)
        assert _until("the third watcher", lambda: _finished(client, third.id), 120).state.is_completed()
        both = _until("the new revision's run", lambda: (r := _runs(client, "expertbits-requantize")) and len(r) >= 3 and r,
                      90)
        assert len(both) == 3, "the same bytes were announced twice"
        newest = next(r for r in both if r.id not in {e.id for e in ends.values()})
        assert _until("the new revision's end", lambda: _finished(client, newest.id), 240).state.is_completed()
        assert newest.parameters["digest"] != first.parameters["digest"]

        # 5. invalid form values are refused by the server, and nothing is written
        before = sorted(fs.find(f"{fs.bucket}/store/runs"))
        from prefect.exceptions import PrefectHTTPStatusError

        for bad in ({"avg_bits": 99}, {"group_size": 2}, {"no_such_field": 1}):
            with pytest.raises((PrefectHTTPStatusError, ValueError)):
                client.create_flow_run_from_deployment(found["quantize"].id, parameters={"params": dict(form, **bad)})
        assert sorted(fs.find(f"{fs.bucket}/store/runs")) == before
    elapsed = time.monotonic() - started
    print(f"\noperate end to end: {elapsed:.0f} s")
    _no_secret_anywhere(platform, fs, store, watched, options)


def _locked(url: str) -> None:
    """Without the auth string (or with a wrong one) the API answers 401 to reads and writes alike;
    only the health probe is open. With it, the same request succeeds."""
    import base64

    import httpx

    def basic(s: str) -> dict:
        return {"Authorization": "Basic " + base64.b64encode(s.encode()).decode()}

    for headers in ({}, basic("expertbits:wrong"), basic(AUTH + "x")):
        assert httpx.post(f"{url}/deployments/filter", json={}, headers=headers, timeout=10).status_code == 401
        assert httpx.post(f"{url}/work_pools/", json={"name": "intruder"}, headers=headers, timeout=10).status_code == 401
        assert httpx.get(f"{url}/admin/settings", headers=headers, timeout=10).status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.post(f"{url}/deployments/filter", json={}, headers=basic(AUTH), timeout=10).status_code == 200


def _no_secret_anywhere(platform, fs, store: str, watched: str, options: dict) -> None:
    """The worker's secret is in no store object (parquet and DuckDB read as their readers read
    them), no row of the server's database (deployments and their parameters, flow runs started by
    the UI, the schedule and the trigger, events with their payloads, logs, artifacts, variables)
    and no log line of the server or worker; values the runs do write are found by the same scan.
    A secret-looking storage option is refused by `expertbits deploy` before anything is registered."""
    from prefect.client.orchestration import get_client
    from support.flowruns import text_of

    from expertbits.flows.cli import main

    # `expertbits deploy`, as compose's deploy job runs it: with the auth string it registers, without it
    # the server refuses, and the error says so
    deploy = [sys.executable, "-m", "expertbits.flows.cli", "deploy", "--work-pool", "expertbits-test", "--store", store,
              "--storage-option", f"endpoint_url={options['endpoint_url']}", "--watch", watched]
    ok = subprocess.run(deploy, env=platform["env"], capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0 and "registered 5 deployments" in ok.stdout, ok.stderr[-2000:]
    anonymous = {k: v for k, v in platform["env"].items() if k != "PREFECT_API_AUTH_STRING"}
    refused = subprocess.run(deploy, env=anonymous, capture_output=True, text=True, timeout=180)
    assert refused.returncode == 1 and "refused the request (401)" in refused.stderr, refused.stderr[-2000:]
    assert "fix: set PREFECT_API_AUTH_STRING" in refused.stderr and "Traceback" not in refused.stderr
    fs.invalidate_cache()
    objects = fs.find(store.removeprefix("s3://"))
    texts = [text_of(k, fs.cat(k), platform["home"]) for k in objects]
    assert len(objects) > 40 and not any(SECRET in t or AUTH in t for t in texts)
    assert any(f"{watched}/m1" in t for t in texts)  # the triggered run's checkpoint, in its manifest and tables
    home = platform["home"]
    db = [f for f in (home / "prefect").glob("prefect.db*") if f.is_file()]  # the database and its WAL
    logs = [home / "server.log", home / "worker.log"]
    data = [f.read_bytes() for f in db + logs]
    assert db and not any(SECRET.encode() in d or AUTH.encode() in d for d in data)
    assert any(b"expertbits.checkpoint.published" in d for d in data)  # events are in what was scanned
    assert any(f"{watched}/m1".encode() in d for d in data)  # and the event payloads and run parameters
    with get_client(sync_client=True) as client:
        before = {d.name: d.parameters for d in client.read_deployments()}
        code = main(["deploy", "--work-pool", "expertbits-test", "--store", store, "--storage-option",
                     f"aws_secret_access_key={SECRET}"])
        assert code == 2 and {d.name: d.parameters for d in client.read_deployments()} == before


def test_dev_up_and_down_start_and_stop_exactly_their_processes(tmp_path):
    """`expertbits dev up --auth` brings the whole local set up on loopback (UI answering,
    deployments registered by a worker and a deploy step that send the printed auth string, which
    the API asks for); `dev down` stops the processes it recorded and nothing else."""
    import base64
    import stat

    import httpx

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    cli = [sys.executable, "-m", "expertbits.flows.cli", "dev"]
    ports = ["--port", str(_port()), "--s3-port", str(_port())]
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    try:
        up = subprocess.run([*cli, "up", "--dir", str(tmp_path / "dev"), *ports, "--auth"], env=env, capture_output=True,
                            text=True, timeout=240)
        assert up.returncode == 0, up.stderr[-3000:]
        state = json.loads((tmp_path / "dev" / "dev.json").read_text())
        assert f"Prefect UI: {state['ui']}" in up.stdout and state["ui"].startswith("http://127.0.0.1:")
        auth_file = tmp_path / "dev" / "auth"
        auth = auth_file.read_text()
        assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600 and auth.startswith("expertbits:") and len(auth) > 30
        assert stat.S_IMODE((tmp_path / "dev").stat().st_mode) == 0o700  # its database holds every run's logs
        # the printed lines are shell a client pastes; the string itself is never printed
        exports = "\n".join(line.split("   #")[0] for line in up.stdout.splitlines() if line.startswith("export "))
        pasted = subprocess.run(["bash", "-c", f'{exports}\nprintf "%s|%s" "$PREFECT_API_URL" "$PREFECT_API_AUTH_STRING"'],
                                capture_output=True, text=True, check=True).stdout
        assert pasted == f"{state['api']}|{auth}" and auth not in up.stdout
        assert auth not in (tmp_path / "dev" / "dev.json").read_text()
        assert not any(auth in log.read_text(errors="replace") for log in (tmp_path / "dev").glob("*.log"))
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
        assert httpx.post(f"{state['api']}/deployments/filter", json={}, timeout=5).status_code == 401
        assert httpx.get(state["ui"], timeout=5).status_code == 200  # the UI's page; it asks for the string itself
        found = httpx.post(f"{state['api']}/deployments/filter", json={}, headers=headers, timeout=5).json()
        # the worker got in with the string: it polls the pool and is online
        _until("the dev worker online", lambda: any(
            w["status"] == "ONLINE" for w in httpx.post(f"{state['api']}/work_pools/expertbits/workers/filter", json={},
                                                         headers=headers, timeout=5).json()), 60)
        assert {d["name"] for d in found} == {"quantize", "league", "quantize-nightly", "watch", "requantize"}
        again = subprocess.run([*cli, "up", "--dir", str(tmp_path / "dev"), *ports], env=env, capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 1 and "already recorded" in again.stderr
        # the same deployments from infra/prefect.yaml, with Prefect's own command
        repo = Path(__file__).resolve().parents[2]
        yaml_deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                                      str(repo / "infra" / "prefect.yaml")], cwd=repo, capture_output=True, text=True,
                                     env=dict(env, PREFECT_API_URL=state["api"], PREFECT_API_AUTH_STRING=auth), timeout=180)
        assert yaml_deploy.returncode == 0, yaml_deploy.stdout[-2000:] + yaml_deploy.stderr[-2000:]
        redeployed = httpx.post(f"{state['api']}/deployments/filter", json={}, headers=headers, timeout=5).json()
        assert sorted(d["name"] for d in redeployed) == sorted(d["name"] for d in found)
    finally:
        down = subprocess.run([*cli, "down", "--dir", str(tmp_path / "dev")], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0 and "server" in down.stdout and "worker" in down.stdout
    for pid in state["pids"].values():
        _until(f"process {pid} to stop", lambda pid=pid: not Path(f"/proc/{pid}").exists()
               or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), 30)
    assert bystander.poll() is None
    bystander.kill()
    assert not (tmp_path / "dev" / "dev.json").exists() and not auth_file.exists()


def test_serve_runs_the_deployments_from_one_process_without_a_work_pool(micro_pair, tmp_path):
    """`expertbits serve-deployments` registers the deployments on a server with no work pool and runs them itself."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def served(client):
        try:
            return client.read_deployment_by_name("expertbits-quantize/quantize")
        except ObjectNotFound:
            return None

    with prefect_server(tmp_path) as (url, env), temporary_settings({PREFECT_API_URL: url}):
        serve = subprocess.Popen([sys.executable, "-m", "expertbits.flows.cli", "serve-deployments", "--store", str(tmp_path / "store")],
                                 env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
        try:
            with get_client(sync_client=True) as client:
                deployment = _until("the served deployments", lambda: served(client), 120)
                assert deployment.work_pool_name is None
                _, ft = micro_pair
                run = client.create_flow_run_from_deployment(deployment.id, parameters={"params": dict(
                    SMALL, checkpoint=str(ft), store=str(tmp_path / "store"))})
                done = _until("the served run", lambda: _finished(client, run.id), 240)
                assert done.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
            assert list((tmp_path / "store" / "runs").glob("*/manifest.json"))
        finally:
            _stop(serve)
