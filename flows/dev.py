"""`expertbits dev up` / `dev down`: the whole local set on loopback, started and stopped by process id.

    up    an S3-compatible server (moto, as the tests use) with a bucket `expertbits`, a `prefect
          server`, a process work pool `expertbits` with one worker, and every deployment
          registered (store s3://expertbits/store, watching s3://expertbits/incoming); prints the
          UI address and the environment to talk to it
    down  stops exactly the processes `up` started (their process groups, by the ids it recorded)

Everything listens on 127.0.0.1 only. With `auth`, the Prefect server asks for basic
authentication (`PREFECT_SERVER_API_AUTH_STRING`, a fresh random `expertbits:<token>`) and the
worker and the deploy step send it (`PREFECT_API_AUTH_STRING`); the string is kept in `auth`
(mode 0600) in the state folder, never in `dev.json` or a log. The S3 server (moto) accepts any
credentials: it is a loopback test double, not a store to open to anyone.

State lives in one folder (default `.expertbits-dev/`): the Prefect home, the checkpoint cache,
the logs and `dev.json` with the process ids. The dev S3 credentials are moto's placeholders, set
only for these processes; a real deployment takes credentials from the worker's environment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STATE = "dev.json"
AUTH = "auth"  # the auth string, when `up` was asked for one
BUCKET = "expertbits"
POOL = "expertbits"


class DevError(RuntimeError):
    pass


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait(what: str, check, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise DevError(f"{what} did not come up within {timeout:.0f} s; see {log}")


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def up(folder: Path, port: int = 4200, s3_port: int = 9100, auth: bool = False) -> dict:
    """Start the set; returns the recorded state (pids, addresses, and with `auth` the file that
    holds the auth string)."""
    folder = folder.resolve()
    if (folder / STATE).exists():
        raise DevError(f"a dev set is already recorded in {folder / STATE}; run `expertbits dev down` first")
    for p in (port, s3_port):
        if not _free(p):
            raise DevError(f"port {p} on 127.0.0.1 is in use; pass --port / --s3-port")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # its database holds every run's logs and parameters
    url, endpoint = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{s3_port}"
    env = dict(os.environ, PREFECT_HOME=str(folder / "prefect"), PREFECT_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", EXPERTBITS_CACHE=str(folder / "cache"),
               AWS_DEFAULT_REGION=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    env.setdefault("AWS_ACCESS_KEY_ID", "moto-placeholder")  # moto accepts anything; real stores use the env
    env.setdefault("AWS_SECRET_ACCESS_KEY", "moto-placeholder")
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)  # the server's is set below, for the server alone
    env.pop("PREFECT_API_AUTH_STRING", None)
    state = {"folder": str(folder), "ui": url.removesuffix("/api"), "api": url, "s3": endpoint, "pids": {}}
    envs = {"s3": env, "server": env}  # moto never sees the string; the server gets its own variable
    if auth:
        string = f"expertbits:{secrets.token_urlsafe(18)}"
        fd = os.open(folder / AUTH, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_TRUNC
        with os.fdopen(fd, "w") as f:
            f.write(string)
        envs["server"] = dict(env, PREFECT_SERVER_API_AUTH_STRING=string)
        env = dict(env, PREFECT_API_AUTH_STRING=string)  # the worker, its flow runs, the deploy step
        state["auth"] = str(folder / AUTH)

    def start(name: str, args: list[str]) -> None:
        log = open(folder / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=envs.get(name, env), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        state["pids"][name] = proc.pid
        state.setdefault("started", {})[name] = _start_time(proc.pid)
        (folder / STATE).write_text(json.dumps(state, indent=2))  # recorded at once: `down` can stop a half-up set

    try:
        start("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)])
        start("server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        _wait("the S3 server", lambda: not _free(s3_port), 30, folder / "s3.log")
        _wait("the Prefect server", lambda: _http_ok(f"{url}/health"), 180, folder / "server.log")
        import s3fs

        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": endpoint})
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process",
                        "--overwrite"], env=env, check=True, capture_output=True)
        start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "2"])
        subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "deploy", "--work-pool", POOL,
                        "--store", f"s3://{BUCKET}/store", "--storage-option", f"endpoint_url={endpoint}",
                        "--watch", f"s3://{BUCKET}/incoming"], env=env, check=True, capture_output=True)
    except BaseException:
        down(folder)
        (folder / AUTH).unlink(missing_ok=True)  # also when nothing was recorded yet
        raise
    return state


def down(folder: Path, timeout: float = 20.0) -> list[str]:
    """Stop the processes recorded by `up` (and nothing else); returns what was stopped."""
    folder = folder.resolve()
    try:
        state = json.loads((folder / STATE).read_text())
    except FileNotFoundError:
        return []
    stopped = []
    for name, pid in reversed(list(state["pids"].items())):
        if _start_time(pid) != state.get("started", {}).get(name):
            continue  # gone, or the id now belongs to another process (after a reboot): not ours to stop
        try:
            os.killpg(pid, signal.SIGTERM)  # its own session: the server's uvicorn child goes with it
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped.append(f"{name} ({pid})")
    (folder / STATE).unlink()
    (folder / AUTH).unlink(missing_ok=True)
    return stopped


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot, from /proc), to tell it from a later one with its id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a child we started and that exited is a zombie until reaped
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True
