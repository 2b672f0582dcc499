"""`expertbits push`: a verified run's quantized folder reaches the hub as one commit, recorded in
the store; a damaged run is refused before any request; the token is never written anywhere.
Against a loopback stand-in for the hub's upload API (tests/support/hub.py)."""

import hashlib
import json

import pytest
from support import hub as standin

from expertbits.flows.cli import main
from expertbits.tasks.store import catalog
from expertbits.tasks.store.push import parse_target
from expertbits.tasks.store.storage import Store
from support.quantized import quantize_mixed

TOKEN = "hf_standinTOKEN0123456789abcdef"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants

    server, state = standin.start(TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # see tests/support/hub.py
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login of this machine's user
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory, micro_pair):
    """A store with one published run (by the manifest's rules: every file listed with its sha256)."""
    root = tmp_path_factory.mktemp("store")
    run = root / "runs" / "micro-2.5b-0123456789"
    quantize_mixed(micro_pair[1], run / "quantization")
    (run / "quantization" / "README.md").write_text("---\nlibrary_name: expertbits\n---\n# a card\n")
    (run / "statistics").mkdir()
    (run / "statistics" / "checkpoints.json").write_text(json.dumps([{"digest": "d" * 64, "role": "finetuned"}]))
    files = {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(run.rglob("*")) if p.is_file()}
    (run / "manifest.json").write_text(json.dumps({
        "run_id": run.name, "uri": str(run), "files": files, "stages": {},
        "summary": {"parameters": {"checkpoint": str(micro_pair[1]), "avg_bits": 2.5}}}))
    return root


def test_targets_parse_and_bad_ones_are_named():
    assert parse_target("hf://org/moe") == ("org/moe", None)
    assert parse_target("hf://org/moe-2.5b@exp/1") == ("org/moe-2.5b", "exp/1")
    for bad in ("org/moe", "hf://moe", "s3://org/moe", "hf://org/moe@"):
        with pytest.raises(ValueError, match="not a hub target"):
            parse_target(bad)


def test_a_push_uploads_the_folder_as_one_commit_and_records_it(hub, store, capsys):
    run = store / "runs" / "micro-2.5b-0123456789"
    assert main(["push", "micro-2.5b-0123456789", "hf://org/moe@exp", "--private", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    repo = hub["repos"]["org/moe"]
    assert repo["private"] and set(repo["branches"]) == {"main", "exp"}
    pushed = repo["branches"]["exp"]
    local = {p.name: p.read_bytes() for p in (run / "quantization").iterdir()}
    assert pushed["files"] == local and "README.md" in pushed["files"]  # byte for byte, the card included
    assert set(hub["validated"]) == {local["README.md"].decode()}  # its metadata checked by the hub first
    assert repo["branches"]["main"]["files"] == {}  # only the named branch moved
    assert any(p.startswith("/lfs-upload/") for _, p, _ in hub["requests"])  # the safetensors went through LFS
    (record,) = (json.loads(p.read_text()) for p in (store / "pushes" / run.name).glob("*.json"))
    assert record["commit"] == pushed["commit"] and record["repo_id"] == "org/moe" and record["branch"] == "exp"
    assert f"commit {pushed['commit']}" in out and pushed["summary"] == f"expertbits run {run.name}"
    frame = catalog.list_runs(Store(str(store)))
    assert frame.pushed.tolist() == [f"org/moe@exp {pushed['commit'][:12]}"]
    # the token went only where it belongs, and nowhere on disk or in the output
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for m, _, h in hub["requests"] if m == "POST")
    assert not any(TOKEN in path for _, path, _ in hub["requests"])
    assert TOKEN not in out and not any(TOKEN.encode() in p.read_bytes() for p in store.rglob("*") if p.is_file())
    # again, into the existing repository: a second commit, a second record
    assert main(["push", str(run), "hf://org/moe"]) == 0
    assert hub["repos"]["org/moe"]["branches"]["main"]["files"] == local
    assert len(list((store / "pushes" / run.name).glob("*.json"))) == 2


def test_a_damaged_run_is_refused_before_any_request(hub, store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "s"
    shutil.copytree(store / "runs", copy / "runs")
    shard = max((copy / "runs" / "micro-2.5b-0123456789" / "quantization").glob("*.safetensors"),
                key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["push", "micro-2.5b-0123456789", "hf://org/moe", "--store", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "differs from its manifest (changed: quantization/" in err and "not pushed" in err and "fix:" in err
    assert hub["requests"] == [] and not (copy / "pushes").exists()
    assert main(["push", "no-such-run", "hf://org/moe", "--store", str(copy)]) == 1
    assert "no published run" in capsys.readouterr().err


def test_a_refused_token_is_a_clear_error_that_never_shows_it(hub, store, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN")
    assert main(["push", "micro-2.5b-0123456789", "hf://org/moe", "--store", str(store)]) == 1
    err = capsys.readouterr().err
    assert "the hub refused the push to org/moe (401)" in err and "HF_TOKEN" in err and "hf_wrongTOKEN" not in err
    assert "org/moe" not in hub["repos"]


def test_private_asked_of_a_public_repository_and_an_unreachable_hub_are_clear_errors(hub, store, monkeypatch,
                                                                                          capsys):
    import socket

    import huggingface_hub.constants

    assert main(["push", "micro-2.5b-0123456789", "hf://org/public", "--store", str(store)]) == 0
    assert not hub["repos"]["org/public"]["private"]
    commit = hub["repos"]["org/public"]["branches"]["main"]["commit"]
    capsys.readouterr()
    assert main(["push", "micro-2.5b-0123456789", "hf://org/public", "--private", "--store", str(store)]) == 1
    assert "exists and is public, and --private was asked for" in capsys.readouterr().err
    assert hub["repos"]["org/public"]["branches"]["main"]["commit"] == commit  # nothing uploaded
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert main(["push", "micro-2.5b-0123456789", "hf://org/moe", "--store", str(store)]) == 1
    err = capsys.readouterr().err
    assert "the push to org/moe failed" in err and "Traceback" not in err and "fix:" in err
