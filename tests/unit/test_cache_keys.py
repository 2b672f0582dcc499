"""Cache keys: the code a stage runs (not its comments, not other stages' wrappers) and the
versions of the libraries that change its bytes."""

import inspect

import expertbits.tasks.stages.quantize_tasks as stages
from expertbits.tasks.stages import stage_io
from expertbits.tasks.stages.stage_io import STAGE_ENTRIES, normalized_source

SOURCE = inspect.getsource(stages)
S = "expertbits.tasks.stages.quantize_tasks"
EVAL_BODY = '    GPU also the served model\'s prefill and decode speed beside full precision\'s (throughput.json)."""\n'


def _edit(source: str, marker: str, insert: str) -> str:
    assert marker in source
    return source.replace(marker, marker + insert, 1)


def test_comments_docstrings_and_layout_do_not_count():
    cosmetic = SOURCE.replace("def evaluation_key(", "# a new comment\n\n\ndef evaluation_key(  # why\n")
    cosmetic = _edit(cosmetic, '    """KL divergence and perplexity', " (a reworded docstring)")
    assert cosmetic != SOURCE and normalized_source(cosmetic) == normalized_source(SOURCE)
    changed = _edit(SOURCE, EVAL_BODY, "    seq_len = seq_len + 0\n")
    assert normalized_source(changed) != normalized_source(SOURCE)


def test_a_stage_keys_only_the_wrappers_it_reaches():
    changed = _edit(SOURCE, EVAL_BODY, "    seq_len = seq_len + 0\n")  # inside evaluate_model
    for stage, moved in (("evaluation", True), ("download", False), ("validation", False), ("allocation", False)):
        entries = STAGE_ENTRIES[stage][S]
        assert (normalized_source(changed, entries) != normalized_source(SOURCE, entries)) == moved, stage
    # a helper a wrapper calls is part of that wrapper's stage
    helper = _edit(SOURCE, "def _e(v: float | None) -> str:\n", "    v = v\n")
    assert normalized_source(helper, ("publish_run",)) != normalized_source(SOURCE, ("publish_run",))
    assert normalized_source(helper, STAGE_ENTRIES["download"][S]) == normalized_source(SOURCE, STAGE_ENTRIES["download"][S])


def test_every_entry_point_exists():
    import importlib

    for stage, modules in STAGE_ENTRIES.items():
        for module, names in modules.items():
            definitions = dict(stage_io.covered(stage)[0])[module]
            assert definitions is None or set(names) <= set(definitions), (stage, module)
            m = importlib.import_module(module)
            assert all(hasattr(m, n) for n in names), (stage, module, [n for n in names if not hasattr(m, n)])


def test_library_versions_are_in_the_keys_but_not_the_downloads(monkeypatch):
    before = {s: stage_io.stage_key(s, "same inputs") for s in ("download", "quantization", "evaluation")}
    # every library the stage's code imports that writes bytes: duckdb and pandas write its parquet
    assert dict(stage_io.library_versions("quantization")).keys() == {"torch", "transformers", "triton", "safetensors",
                                                                      "duckdb", "pandas", "numpy", "tokenizers"}
    assert {"scipy", "numpy"} <= dict(stage_io.library_versions("allocation")).keys()  # the MILP allocators
    assert {"matplotlib", "pillow"} <= dict(stage_io.library_versions("league")).keys()  # its figures
    assert not {"prefect", "s3fs", "fsspec"} & dict(stage_io.library_versions("league")).keys()
    real = stage_io.library_versions
    monkeypatch.setattr(stage_io, "library_versions",
                        lambda stage: tuple((lib, v + ".post1") for lib, v in real(stage)))  # an upgrade
    after = {s: stage_io.stage_key(s, "same inputs") for s in before}
    assert after["download"] == before["download"]
    assert after["quantization"] != before["quantization"] and after["evaluation"] != before["evaluation"]


def test_statements_that_are_not_definitions_always_count():
    entries = STAGE_ENTRIES["download"][S]
    for extra in ("from .quantizer import QuantizerConfig as Store\n", "torch_flag = 1\nimport os\nos.environ['X'] = '1'\n",
                  "if True:\n    _download_key = None\n"):
        edited = SOURCE.replace("\n# ---- 1. download", "\n" + extra + "\n# ---- 1. download", 1)
        assert normalized_source(edited, entries) != normalized_source(SOURCE, entries), extra


def test_the_code_a_key_covers_follows_the_import_graph():
    """A definition a stage reaches through an import is in its key; one it does not reach is not."""
    covered = dict(stage_io.covered("allocation")[0])
    assert covered["expertbits.tasks.stages.quantize_tasks"] == ("allocate_bits", "allocation_key")  # not the others
    assert covered["expertbits.tasks.allocation.allocate"] is None  # imported as a module: all of it
    assert "expertbits.tasks.allocation.allocators" in covered  # reached through allocate
    assert "expertbits.tasks.measure.evaluate" not in covered and "expertbits.kernels.gptq" not in covered
    evaluation = dict(stage_io.covered("evaluation")[0])
    assert "expertbits.tasks.measure.evaluate" in evaluation and "expertbits.kernels.modules" in evaluation
    assert "expertbits.tasks.allocation.allocators" not in evaluation
    # imported only for its side effect (registering the packed format with transformers): covered
    assert "expertbits.tasks.model.load" in dict(stage_io.covered("routing")[0])
