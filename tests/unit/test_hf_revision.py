"""hf:// without a commit is resolved to the commit its branch points at now, against a stand-in
for the hub's API on loopback (the hub itself is not reachable here), through huggingface_hub."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from expertbits.tasks.checkpoints.fetch import fingerprint, resolve_hf
from expertbits.tasks.errors import CheckpointError


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    state = {"main": "a" * 40, "v1": "b" * 40, "requests": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # /api/models/<org>/<name>[/revision/<rev>]
            state["requests"].append(self.path)
            parts = self.path.split("?")[0].strip("/").split("/")
            repo, rev = "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main"
            if parts[:2] != ["api", "models"] or repo != "org/moe" or rev not in state:
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": "Repository not found"}')
                return
            body = json.dumps({"id": repo, "sha": state[rev], "siblings": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield state
    server.shutdown()


def test_a_branch_resolves_to_its_current_commit_and_the_key_follows_it(hub):
    assert resolve_hf("org/moe", "hf://org/moe") == ("org/moe", "a" * 40)
    first = fingerprint("hf://org/moe")
    assert first == f"hf:org/moe@{'a' * 40}" == fingerprint("hf://org/moe@main")
    hub["main"] = "c" * 40  # a new commit on the branch: the cached copy must not be reused
    assert fingerprint("hf://org/moe") == f"hf:org/moe@{'c' * 40}" != first
    assert fingerprint("hf://org/moe@v1") == f"hf:org/moe@{'b' * 40}"


def test_a_commit_is_used_as_given_without_asking_the_hub(hub):
    asked = len(hub["requests"])
    assert fingerprint(f"hf://org/moe@{'d' * 40}") == f"hf:org/moe@{'d' * 40}"
    assert len(hub["requests"]) == asked


@pytest.mark.parametrize("uri,reason", [("hf://org/missing", "cannot resolve"), ("hf://org/moe@nobranch", "cannot resolve"),
                                        ("hf://moe", "expected hf://org/name"), ("hf://org/", "expected hf://org/name")])
def test_unresolvable_names_are_refused_with_the_fix(hub, uri, reason):
    with pytest.raises(CheckpointError, match=reason) as err:
        fingerprint(uri)
    assert "hf://org/name" in str(err.value)


def test_offline_refs_cannot_leave_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "secret").write_text("x" * 40)
    for uri in ("hf://org/moe@../../../secret", "hf://org/moe@/etc/hostname", "hf://org/..@main"):
        with pytest.raises(CheckpointError) as err:
            fingerprint(uri)
        assert "x" * 40 not in str(err.value)


def test_an_unreachable_hub_is_a_transient_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ConnectionError, match="did not answer"):  # an OSError: Prefect's retry rule retries it
        fingerprint("hf://org/moe")
