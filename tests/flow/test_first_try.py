"""A user's own checkpoint on the first try: defaults that fit any checkpoint (the reference is what
the user names, what the checkpoint declares, or none), and errors in the user's words (their URI,
one line per bad option, checked before Prefect starts, no traceback without --debug)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.archs import build

from expertbits.tasks.checkpoints import reference as refs
from expertbits.tasks.errors import CheckpointError, remember_source


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`expertbits ARGS` as a user runs it: a fresh process and its own temporary Prefect API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(cwd / "prefect-home")
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    return subprocess.run([sys.executable, "-m", "expertbits.flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def only_run(store: Path) -> dict:
    runs = list((store / "runs").iterdir())
    assert len(runs) == 1, runs
    return json.loads((runs[0] / "manifest.json").read_text())


@pytest.fixture(scope="module")
def qwen(micro_pair, tmp_path_factory) -> Path:
    """A Qwen2-MoE (not the default's family: 4 experts, hidden 32, shared experts) with the micro
    pair's own 300-token tokenizer (not the zoo's 4096)."""
    return build("qwen2_moe", tmp_path_factory.mktemp("own") / "my-qwen", tokenizer=micro_pair[1])


# ---- declared base models ------------------------------------------------------------------------

def _hub_card(base) -> str:
    """A model card front matter as huggingface_hub writes it (block lists without indent)."""
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(base_model=base, license='apache-2.0').to_yaml()}\n---\n# card\n"


@pytest.mark.parametrize("card, expected", [
    ("---\nbase_model: mistralai/Mixtral-8x7B-v0.1\nlicense: apache-2.0\n---\n# x", "mistralai/Mixtral-8x7B-v0.1"),
    ("---\nlicense: mit\nbase_model:\n  - ../base\ntags: [moe]\n---\n", "../base"),
    ("---\nbase_model: \"zoo://mixtral-tiny/base\"  # the parent\n---\n", "zoo://mixtral-tiny/base"),
    ("---\nbase_model: org/name\t# a tab before the comment\n---\n", "org/name"),
    ("\ufeff---\nbase_model: org/bom\n---\n", "org/bom"),  # a byte order mark
    ("---\nbase_model: [a/b, c/d]\n---\n", "a/b\nc/d"),  # a merge: resolve() refuses it
    ("---\nbase_model:\n---\n", None), ("---\nbase_model: null\n---\n", None), ("---\nbase_model: ~\n---\n", None),
    ("# no front matter\nbase_model: a/b\n", None),
    ("---\nlicense: mit\n---\nbase_model: a/b\n", None),  # after the front matter: prose, not metadata
])
def test_front_matter_base_model(card, expected):
    assert refs.front_matter_base(card) == expected


def test_cards_as_the_hub_writes_them():
    assert refs.front_matter_base(_hub_card("Qwen/Qwen2.5-7B")) == "Qwen/Qwen2.5-7B"
    assert refs.front_matter_base(_hub_card(["Qwen/Qwen2.5-7B"])) == "Qwen/Qwen2.5-7B"  # `- x`, not indented
    assert refs.front_matter_base(_hub_card(["a/b", "c/d"])) == "a/b\nc/d"


def test_declared_base_in_card_before_config():
    assert refs.declared_base(None, {"base_model": "org/from-config"}) == ("org/from-config", "config.json")
    assert refs.declared_base("---\nbase_model: org/from-card\n---\n", {"base_model": "x/y"}) == ("org/from-card", "README.md")
    assert refs.declared_base("just prose", {"model_type": "mixtral"}) is None
    assert refs.declared_base(None, {"base_model": None}) is None and refs.declared_base(None, {"base_model": "null"}) is None


def test_declared_values_resolve_like_any_source(tmp_path):
    assert refs.resolve("mistralai/Mixtral-8x7B-v0.1", "s3://b/ft") == "hf://mistralai/Mixtral-8x7B-v0.1"
    assert refs.resolve("zoo://mixtral-tiny/base", "/x/ft") == "zoo://mixtral-tiny/base"
    assert refs.resolve("zoo://mixtral-tiny/base", "s3://b/ft") == "zoo://mixtral-tiny/base"
    assert refs.resolve("../base", "zoo://mixtral-tiny/wordnet") == "zoo://mixtral-tiny/base"
    assert refs.resolve("../base", "s3://bucket/incoming/ft/") == "s3://bucket/incoming/base"
    assert refs.resolve("s3://bucket/bases/b", "s3://bucket/incoming/ft") == "s3://bucket/bases/b"
    assert refs.resolve("./base", str(tmp_path / "ft")) == str(tmp_path / "ft" / "base")
    assert refs.resolve("../base", f"file://{tmp_path}/ft") == f"file://{tmp_path}/base"
    assert refs.resolve("/models/base", str(tmp_path / "ft")) == "/models/base"  # the user's own machine
    assert refs.resolve("../x", "zoo://fam/v") == "zoo://fam/x"


@pytest.mark.parametrize("value, checkpoint, why", [
    ("../../x", "s3://bucket/ft", "not followed"),  # out of the bucket
    ("../../other-bucket/x", "s3://bucket/ft", "not followed"),
    ("s3://other-bucket/x", "s3://bucket/ft", "not followed"),
    ("file:///etc/model", "s3://bucket/ft", "not followed"),
    ("/etc/model", "s3://bucket/ft", "not on this machine"),
    ("~/model", "hf://org/ft", "not on this machine"),
    ("s3://bucket/x", "hf://org/ft", "not followed"),
    ("../base", "hf://org/ft", "hub repository"),
    ("../../x", "zoo://fam/v", "not followed"),
    ("a/b\nc/d", "/x", "merge"),
    ("not a name", "/x", "neither"),
])
def test_a_remote_checkpoint_may_not_point_at_local_files_or_other_buckets(value, checkpoint, why):
    with pytest.raises(ValueError, match=why):
        refs.resolve(value, checkpoint)


def test_choose_given_declared_and_none():
    none = refs.choose("my/ft", {}, None, None)
    assert none.uri is None and none.source == "none" and "my/ft declares no base model" in none.reason
    assert "--reference" in none.note
    assert refs.choose("my/ft", {}, None, "None").source == "none-given"
    assert refs.choose("my/ft", {"base_model": "a/b"}, None, "/models/base").model_dump() == {
        "uri": "/models/base", "source": "given", "reason": "as given", "note": "Λ against /models/base, as given",
        "declared": None}
    found = refs.choose("/m/ft", {}, "---\nbase_model: ../base\n---\n", None)
    assert (found.uri, found.source, found.declared) == ("/m/base", "declared in README.md", "../base")
    refused = refs.choose("s3://b/ft", {}, "---\nbase_model: /etc/secret-model\n---\n", None)
    assert refused.uri is None and refused.declared == "/etc/secret-model" and "not on this machine" in refused.reason
    unread = refs.choose("hf://org/ft", {}, None, None, card_problem="offline")
    assert "could not be read (offline)" in unread.reason


def test_zoo_fine_tunes_declare_their_base():
    from expertbits.tasks.checkpoints.fetch import read_card

    for ft, base in (("mixtral-tiny/wordnet", "mixtral-tiny/base"), ("qwen-moe-tiny/wordnet", "qwen-moe-tiny/base"),
                     ("switch-tiny/wordnet", "switch-tiny/base")):
        choice = refs.choose(f"zoo://{ft}", {}, read_card(f"zoo://{ft}"), None)
        assert (choice.uri, choice.source) == (f"zoo://{base}", "declared in README.md")


def test_the_card_is_read_from_the_source_not_part_of_the_digest(micro_pair, tmp_path):
    """An edited card changes no checkpoint digest (nothing is requantized for prose)."""
    from expertbits.tasks.checkpoints.fetch import download, read_card

    mine = tmp_path / "ft"
    shutil.copytree(micro_pair[1], mine)
    assert read_card(str(mine)) is None
    before = download(str(mine), tmp_path / "cache").digest
    (mine / "README.md").write_text("---\nbase_model: ../base\n---\n" + "prose " * 30_000)
    assert download(str(mine), tmp_path / "cache").digest == before
    assert read_card(str(mine)).startswith("---\nbase_model: ../base") and len(read_card(str(mine))) == 1 << 16


# ---- errors in the user's words ------------------------------------------------------------------

def test_errors_name_the_uri_not_the_cache_folder(tmp_path):
    cache = tmp_path / "cache" / "checkpoints" / ("ab" * 32)
    remember_source(cache, "s3://models/my-moe")
    e = CheckpointError(f"{cache}: layer 3 has NaN; {cache}2 is another folder; {cache}/model.safetensors", "use a healthy one")
    assert e.problem == f"s3://models/my-moe: layer 3 has NaN; {cache}2 is another folder; s3://models/my-moe/model.safetensors"
    assert str(e).splitlines()[-1] == f"  cached copy: {cache}"  # the folder only as a detail, after the fix
    inside = CheckpointError(f"/mnt{cache}/x and {cache}", "fix")  # another folder that ends like it: kept
    assert inside.problem == f"/mnt{cache}/x and s3://models/my-moe"
    import pickle

    back = pickle.loads(pickle.dumps(CheckpointError(f"{cache}: bad", "fix", "checkpoint")))  # from a Dask worker
    assert (type(back), str(back), back.option) == (CheckpointError, str(CheckpointError(f"{cache}: bad", "fix")), "checkpoint")


def test_bad_options_are_one_line_each_naming_the_option_and_fix(capsys):
    from expertbits.flows.cli import main

    cases = [
        (["quantize", "--avg-bits", "9"], "  --avg-bits: got 9.0: input should be less than or equal to 8; fix: give at most 8"),
        (["quantize", "--bit-widths", "2,3", "--avg-bits", "3.5"],
         "  --avg-bits: average budget 3.5 bits is outside the available bit-widths [2, 3]; fix: choose --avg-bits "
         "between 2 and 3, or add bit-widths"),
        (["quantize", "--allocator", "best"], "  --allocator: unknown allocator 'best'; fix: choose one of"),
        (["quantize", "--quantizer", "awq"], "  --quantizer: unknown quantizer 'awq'; fix: choose one of rtn, gptq"),
        (["quantize", "--group-size", "2", "--eval-windows", "0"], "  --group-size: got 2: input should be greater than "
         "or equal to 8; fix: give at least 8\n  --eval-windows: got 0:"),
        (["league", "--allocators", "paper,best"], "  --allocators: unknown allocators ['best']; fix: choose from"),
        (["league", "--quantizers", "rtn,awq"], "  --quantizers: unknown quantizer 'awq'; fix: choose one of rtn, gptq"),
        (["quantize", "--storage-option", "secret=x"], "  --storage-option: storage_options must not carry credentials"),
        (["quantize", "--cache-dir", "s3://b/cache"], "  --cache-dir: s3://b/cache: the checkpoint cache is a local folder"),
        (["quantize", "--avg-bits", "9", "--checkpoint", "no/such/folder"],  # both, though one option is invalid
         "  --avg-bits: got 9.0: input should be less than or equal to 8; fix: give at most 8\n  --checkpoint: no/such/folder"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("expertbits: invalid options:\n") and expected in err, (argv, err)
        assert "pydantic" not in err and "input_value" not in err and "[type=" not in err


@pytest.mark.slow
def test_deployment_options_are_named_as_given(capsys):
    from expertbits.flows.cli import main

    base = ["deploy", "--work-pool", "p", "--watch", "s3://b/in"]
    cases = [
        (["--watch-quantize", '{"avg_bits": 9}'], "  --watch-quantize avg_bits: got 9: input should be less than or equal to 8"),
        (["--watch-quantize", '{"quantizer": "awq"}'], "  --watch-quantize quantizer: unknown quantizer 'awq'"),
        (["--watch-quantize", "{avg_bits: 2}"], "  --watch-quantize: Expecting property name"),
        (["--watch-quantize", '{"checkpoint": "x"}'], "  --watch-quantize: quantize must not set ['checkpoint']"),
        (["--watch-reference", "just-a-uri"], "  --watch-reference: 'just-a-uri' is not PREFIX=URI"),
        (["--watch-reference", "s3://b/other=zoo://mixtral-tiny/base"], "  --watch-reference: references name prefixes"),
        (["--storage-option", "token=x"], "  --storage-option: storage_options must not carry credentials"),
    ]
    for extra, expected in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("expertbits: invalid deployment options:\n") and expected in err, (extra, err)
        assert "--watch-quantizer" not in err and "--prefixes" not in err and "--storage-options" not in err
    # serving the deployments checks them alike; its old name `serve` still does, and says it is deprecated
    for command in ("serve-deployments", "serve"):
        assert main([command, "--watch", "s3://b/in", "--watch-quantize", '{"avg_bits": 9}']) == 2
        err = capsys.readouterr().err
        assert "--watch-quantize avg_bits: got 9" in err
        assert ("`expertbits serve` is deprecated" in err) == (command == "serve")


def test_local_problems_are_reported_before_prefect_starts(tmp_path, qwen):
    unknown = tmp_path / "unknown"
    shutil.copytree(qwen, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="llama", architectures=["LlamaForCausalLM"])))
    notok = tmp_path / "no-tokenizer"
    shutil.copytree(qwen, notok, ignore=shutil.ignore_patterns("tokenizer*"))
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--checkpoint", "my-model"], f"  --checkpoint: my-model ({tmp_path / 'my-model'}): no such folder; fix: point at a "
                                       "checkpoint folder holding config.json and *.safetensors"),
        (["--checkpoint", "unknown"], "  --checkpoint: unknown: model_type 'llama' has expert tensors but no expertbits "
                                      "adapter; fix: supported model types: "),
        (["--checkpoint", "no-tokenizer"], "  --checkpoint: no-tokenizer "),
        (["--reference", "zoo://mixtral-tiny/bse"], "  --reference: zoo://mixtral-tiny/bse: no zoo model"),
        (["--eval-text", "held-out.txt", "--calibration-text", "zoo://text/nope"],
         "  --calibration-text: zoo://text/nope: no bundled text of that name; fix: give a UTF-8 text file"),
        (["--store", "a-file/store"], "  --store: a-file/store: a-file is a file, not a folder; fix: name a folder"),
    ]
    for args, expected in cases:
        out = cli("quantize", *args, cwd=tmp_path, timeout=120)
        assert out.returncode == 2 and expected in out.stderr, (args, out.stderr)
        assert "Starting temporary server" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "no tokenizer (tokenizer.json or tokenizer.model or vocab.json); fix: save the tokenizer" in \
        cli("quantize", "--checkpoint", "no-tokenizer", cwd=tmp_path, timeout=120).stderr
    assert "  --eval-text: held-out.txt: no such file" in \
        cli("quantize", "--eval-text", "held-out.txt", cwd=tmp_path, timeout=120).stderr
    # a reference needs only its routers: no tokenizer asked of it
    from expertbits.flows.params import local_problems

    assert local_problems({"checkpoint": str(qwen), "reference": str(notok)}) == []


def test_watch_maps_prefixes_to_references(tmp_path):
    from pydantic import ValidationError

    from expertbits.flows.params import WatchParams

    w = WatchParams(prefixes=["s3://b/in"], store=str(tmp_path / "store"), quantize={"avg_bits": 3.0},
                    references={"s3://b/in/mixtral": "hf://mistralai/Mixtral-8x7B-v0.1", "s3://b/in/mixtral/v2": "s3://b/v2"})
    assert w.quantize_params("s3://b/in/mixtral/ft-1").reference == "hf://mistralai/Mixtral-8x7B-v0.1"
    assert w.quantize_params("s3://b/in/mixtral/v2/ft").reference == "s3://b/v2"  # the longest prefix wins
    assert w.quantize_params("s3://b/in/mixtral2/ft").reference is None  # not under s3://b/in/mixtral
    assert w.quantize_params("s3://b/in/qwen/ft").avg_bits == 3.0
    with pytest.raises(ValidationError, match="outside the watched prefixes"):
        WatchParams(prefixes=["s3://b/in"], references={"s3://b/elsewhere": "zoo://mixtral-tiny/base"})


# ---- end to end, as a user runs it ----------------------------------------------------------------

@pytest.mark.integration
def test_a_model_of_another_family_quantizes_with_only_checkpoint(qwen, tmp_path):
    shutil.copytree(qwen, tmp_path / "my-qwen")
    out = cli("quantize", "--checkpoint", "my-qwen", "--store", "store", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = only_run(tmp_path / "store")
    s = manifest["summary"]
    assert s["parameters"]["reference"] is None and s["parameters"]["checkpoint"] == "my-qwen"
    assert s["reference"]["uri"] is None and s["reference"]["source"] == "none"
    assert s["statistics"]["lambda_source"] == "final-norm-proxy" and s["statistics"]["model_type"] == "qwen2_moe"
    lines = out.stdout.strip().splitlines()
    assert lines[-4].startswith("Λ: final router norm, no reference: my-qwen declares no base model")
    calib, ev = s["calibration"], s["evaluation"]
    assert lines[-3] == f"calibration text: zoo://text/wordnet-supersense-train ({calib['windows']} windows of 256 tokens)"
    assert lines[-2] == f"evaluation text: zoo://text/wordnet-supersense-test ({ev['windows']} windows of 256 tokens)"
    assert ev["windows"] == 16 and ev["text"] == "zoo://text/wordnet-supersense-test"  # the 300-token vocabulary fills them
    assert lines[-1] == f"artifacts: {tmp_path / 'store' / 'runs' / manifest['run_id']}"
    assert "WARNING" in out.stderr and "declares no base model" in out.stderr  # the run says so as it runs, too


@pytest.mark.integration
def test_a_declared_base_model_gives_lambda(prefect_api, params, micro_pair, tmp_path):
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    base, ft = micro_pair
    shutil.copytree(base, tmp_path / "models" / "base")
    mine = tmp_path / "models" / "ft"
    shutil.copytree(ft, mine)
    (mine / "README.md").write_text("---\nbase_model: ../base\n---\n# my fine-tune\n")
    declared = quantize_moe(QuantizeParams(**dict(params, checkpoint=str(mine), reference=None)))
    assert declared.summary["reference"] == {"uri": str(tmp_path / "models" / "base"), "source": "declared in README.md",
                                             "reason": "declared in README.md", "declared": "../base",
                                             "note": declared.summary["reference"]["note"]}
    assert declared.summary["statistics"]["lambda_source"] == "norm-change"
    # the same reference bytes named by hand: the same run, kept as first published, and the run
    # reports how it found its reference this time
    given = quantize_moe(QuantizeParams(**dict(params, checkpoint=str(mine), reference=str(base))))
    assert given.run_id == declared.run_id and given.summary["reference"]["source"] == "given"
    assert given.summary["parameters"]["reference"] == str(base)
    unrelated = quantize_moe(QuantizeParams(**dict(params, checkpoint=str(mine), reference="none")))
    assert unrelated.summary["statistics"]["lambda_source"] == "final-norm-proxy"
    assert unrelated.summary["reference"]["source"] == "none-given"

    # a declared base that cannot be used (its routers differ) is reported, and the run goes on
    (mine / "README.md").write_text("---\nbase_model: zoo://mixtral-tiny/base\n---\n")
    mismatched = quantize_moe(QuantizeParams(**dict(params, checkpoint=str(mine), reference=None)))
    ref = mismatched.summary["reference"]
    assert ref["uri"] is None and ref["declared"] == "zoo://mixtral-tiny/base" and "does not match" in ref["reason"]
    assert mismatched.summary["statistics"]["lambda_source"] == "final-norm-proxy"
    # named by hand, the same base is an error
    with pytest.raises(CheckpointError, match="does not match checkpoint"):
        quantize_moe(QuantizeParams(**dict(params, checkpoint=str(mine), reference="zoo://mixtral-tiny/base")))


@pytest.mark.integration
def test_a_failed_run_ends_with_the_error_and_its_fix_in_the_users_words(qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(qwen, tmp_path / "my-qwen")
    out = cli("quantize", "--checkpoint", "my-qwen", "--reference", "zoo://mixtral-tiny/base", "--store", "store",
              cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-2:] == [
        "expertbits: reference zoo://mixtral-tiny/base (--reference) does not match checkpoint my-qwen: layer 0's router "
        "is 8×128 in the reference, 4×32 in the checkpoint (4 of 4 MoE layers differ)",
        "  fix: name the checkpoint this model was fine-tuned from with --reference (for a watched prefix: "
        "--watch-reference), or give --reference none to use the final router norm"]
    assert not (tmp_path / "store" / "runs").exists()

    # an error found deep in a stage, on the cached copy: named by the user's path, the cache as a detail
    t = load_file(tmp_path / "my-qwen" / "model.safetensors")
    router = next(k for k in t if k.endswith("mlp.gate.weight"))
    t[router][0, 0] = float("nan")
    save_file(t, tmp_path / "my-qwen" / "model.safetensors", metadata={"format": "pt"})
    out = cli("quantize", "--checkpoint", "my-qwen", "--store", "store", cwd=tmp_path)
    last = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert last[-3] == f"expertbits: my-qwen: {router} has 1 NaN/Inf values", last[-6:]
    assert last[-2].startswith("  fix: ") and last[-1].startswith("  cached copy: ") and "checkpoints" in last[-1]
    debug = cli("quantize", "--checkpoint", "my-qwen", "--store", "store", "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
