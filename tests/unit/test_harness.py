"""lm-evaluation-harness through the shipped model: the zoo's offline tasks agree with the project's
own scorer and with a hand-computed perplexity, both columns are real evaluations, and a task that
cannot run is a clear error before any model loads."""

import json
import math
from pathlib import Path

import pytest
import torch

from expertbits.tasks.errors import ExpertbitsError
from expertbits.tasks.measure import harness
from expertbits.tasks.model.load import load
from expertbits.zoo import resolve, text_path
from support.quantized import quantize_mixed

pytestmark = pytest.mark.slow  # each test loads lm-eval's task index (seconds) and runs models

CONFIG = harness.HarnessConfig(tasks=("expertbits_supersense", "expertbits_ppl_code"), limit=3 * 16, batch_size=16)


@pytest.fixture(scope="module")
def wordnet_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The zoo's WordNet fine-tune and a mixed-width (2/3/4-bit) quantized folder of it."""
    fp = resolve("zoo://mixtral-tiny/wordnet")
    q = tmp_path_factory.mktemp("harness") / "q"
    quantize_mixed(fp, q)
    return fp, q


@pytest.fixture(scope="module")
def compared(wordnet_pair):
    """lm-eval on both models, once for the module (the expensive part)."""
    return harness.compare(*wordnet_pair, CONFIG)


def test_each_column_is_its_models_own_evaluation_and_supersense_is_the_projects_scorer(wordnet_pair, compared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertbits.zoo.cards import supersense_accuracy

    table, raw = compared
    by = {(r.task, r.metric): r for r in table.itertuples()}
    assert set(by) == {("expertbits_supersense", "acc"), ("expertbits_ppl_code", "bits_per_byte"),
                       ("expertbits_ppl_code", "byte_perplexity"), ("expertbits_ppl_code", "word_perplexity")}
    bpb = by[("expertbits_ppl_code", "bits_per_byte")]
    assert bpb.quant != bpb.fp and bpb.diff == pytest.approx(bpb.quant - bpb.fp)
    acc = by[("expertbits_supersense", "acc")]
    assert acc.samples == 48 and acc.quant_stderr > 0 and acc.fp_stderr > 0
    fp_model = AutoModelForCausalLM.from_pretrained(wordnet_pair[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(wordnet_pair[0])
    q_model, _ = load(wordnet_pair[1])
    with torch.no_grad():  # the project's own scorer, on the same 48 glosses, each model on its own
        assert acc.fp == supersense_accuracy(fp_model, tok, limit=48)
        assert acc.quant == supersense_accuracy(q_model, tok, limit=48)
    assert set(raw["seconds"]) == {"fp", "quant"} and raw["config"]["tasks"] == list(CONFIG.tasks)
    md = harness.markdown(table)
    assert "| expertbits_supersense | acc |" in md and "±" in md


def _bits_per_byte(model, tok, docs: list[str], window: int) -> float:
    """The stated perplexity protocol, by hand: each document's tokens in disjoint windows of
    `window` tokens, the first token predicted from the prefix token (EOS), the others from
    the tokens before them in their window; bits summed over documents over their UTF-8 bytes."""
    nll = 0.0
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        targets = torch.tensor(ids)
        for start in range(0, len(ids), window):
            chunk = targets[start:start + window]
            ctx = torch.cat([torch.tensor([tok.eos_token_id]), chunk[:-1]]) if start == 0 else \
                targets[start - 1:start + len(chunk) - 1]
            logp = model(ctx[None]).logits[0].float().log_softmax(-1)
            nll -= float(logp.gather(1, chunk[:, None]).sum())
    return nll / math.log(2) / sum(len(d.encode()) for d in docs)


def test_the_zoo_perplexity_task_follows_its_stated_protocol(wordnet_pair, compared):
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_data", harness.zoo_tasks() / "expertbits_zoo_data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    text = text_path("code-heldout").read_text()
    docs = data.documents(text)
    assert "".join(docs) == text  # the documents cover the text, whole lines, in order
    assert all(len(d) >= data.DOC_CHARS and d.endswith("\n") for d in docs[:-1])
    assert [row["text"] for row in data.code()["test"]] == docs
    rows = [r for r in compared[1]["quant"]["rows"] if r["task"] == "expertbits_ppl_code"]
    got = {r["metric"]: r["value"] for r in rows}
    model, tok = load(wordnet_pair[1])
    window = model.config.max_position_embeddings
    with torch.no_grad():
        assert got["bits_per_byte"] == pytest.approx(_bits_per_byte(model, tok, docs[:48], window), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(2 ** got["bits_per_byte"], rel=1e-6)


def test_a_users_task_folder_over_local_json_files(wordnet_pair, tmp_path):
    """The documented way to bring one's own task: `dataset_path: json` over a local file."""
    rows = [{"q": "a large cat of the forest", "a": 0}, {"q": "a tool for cutting wood", "a": 1}]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text(
        "task: my_animals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}} =>"\ndoc_to_choice: ["animal", "artifact"]\ndoc_to_target: a\n'
        "metric_list:\n  - metric: acc\n")
    model, tok = load(wordnet_pair[1])
    got, _ = harness.run(model, tok, harness.HarnessConfig(tasks=("my_animals",), include_path=str(tmp_path / "tasks")))
    assert [(r["task"], r["metric"], r["samples"]) for r in got] == [("my_animals", "acc", 2)]


def test_unknown_and_unreachable_tasks_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(ExpertbitsError, match=r"lm-eval task 'no_such_task': not among(.|\n)*--include-path"):
        harness.check_tasks(harness.HarnessConfig(tasks=("no_such_task",)))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as HF_DATASETS_OFFLINE=1 sets it
    with pytest.raises(ExpertbitsError, match=r"lm-eval task 'arc_easy': its dataset could not be loaded"
                                              r"(.|\n)*HF_DATASETS_OFFLINE=1") as e:
        harness.check_tasks(harness.HarnessConfig(tasks=("arc_easy",)))
    assert "Traceback" not in str(e.value)
    with pytest.raises(ExpertbitsError, match="no such folder"):
        harness.task_manager(str(tmp_path / "absent"))
    with pytest.raises(ExpertbitsError, match="give one or more task names"):
        harness.HarnessConfig(tasks=())


def test_the_league_ranks_by_an_lm_eval_task_as_by_the_projects_scorer(wordnet_pair):
    """`--task lm-eval:expertbits_supersense` gives each cell the accuracy `--task wordnet-supersense`
    does, on the model as the league holds it (streamed, its experts from the packed bytes)."""
    from expertbits.tasks.measure import league
    from expertbits.tasks.model.streaming import streamed
    from expertbits.tasks.model.load import load as load_folder

    ours, theirs = league.task("wordnet-supersense", 16), league.task("lm-eval:expertbits_supersense", 16)
    _, tok = load_folder(wordnet_pair[1])
    with streamed(wordnet_pair[1]) as model, torch.no_grad():
        assert theirs(model, tok) == ours(model, tok)
    with pytest.raises(ExpertbitsError, match="reports no accuracy"):
        league.task("lm-eval:expertbits_ppl_code", 2)(load_folder(wordnet_pair[1])[0], tok)
    with pytest.raises(ExpertbitsError, match="not among"):
        league.task("lm-eval:no_such_task", 2)


def test_the_documented_lm_eval_snippet_runs_as_written(wordnet_pair):
    """docs/evaluation.md, "lm-eval your own way": HFLM over a model from expertbits.load."""
    import re

    doc = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    section = doc.split("## lm-eval your own way", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"expertbits-store/runs/<id>/quantization"', repr(str(wordnet_pair[1])))
    code = code.replace("print(results", "captured = (results")
    scope: dict = {}
    exec(compile(code, "docs/evaluation.md", "exec"), scope)
    acc = scope["captured"]["expertbits_supersense"]["acc,none"]
    model, tok = load(wordnet_pair[1])
    from expertbits.zoo.cards import supersense_accuracy

    with torch.no_grad():
        assert acc == supersense_accuracy(model, tok, limit=100)


def test_evaluate_names_its_own_options_and_a_missing_run(tmp_path, capsys):
    from expertbits.flows.cli import main

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"run_id": "r1", "stages": {}, "summary": {"parameters": {
        "checkpoint": "zoo://mixtral-tiny/wordnet", "avg_bits": 2.5}}}))
    assert main(["evaluate", "r1", "--store", str(tmp_path), "--tasks", "x", "--limit", "0"]) == 2
    assert "--limit: got 0: input should be greater than or equal to 1" in capsys.readouterr().err
    assert main(["evaluate", "r2", "--store", str(tmp_path), "--tasks", "x"]) == 1
    assert "runs/r2: no published run" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "elsewhere" / "r1"), "--tasks", "x"]) == 1
    assert "not a run folder" in capsys.readouterr().err
