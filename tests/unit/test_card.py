"""The quantized folder's model card: hub front matter (read back by huggingface_hub's own parser),
the license carried over from the source, base_model only for hub sources, the per-layer table."""

from huggingface_hub import ModelCard

from expertbits.tasks.store.card import render, source_license

QC = {"expert_bits": {"0": [2, 3, 4, 2], "1": [4, 4, 2, 2]}, "group_size": 64, "symmetric": False}
SUMMARIES = {"allocation": {"allocator": "output-error", "scope": "model", "granularity": "expert",
                            "requested_avg_bits": 2.875, "achieved_avg_bits": 2.875,
                            "experts_per_bits": {"2": 4, "3": 1, "4": 3}},
             "quantization": {"effective_bits": 3.3, "quantizer": "gptq+rot", "fraction_of_bf16": 0.4,
                              "model_bits_per_parameter": 6.1}}
EVAL = {"kl": 0.0123, "ppl_fp": 10.0, "ppl_quant": 10.5, "tokens": 4080, "windows": 16, "seq_len": 256,
        "text": "zoo://text/x"}


def card(tmp_path, checkpoint, source=None, qc=QC, **kw):
    text = render(parameters={"checkpoint": checkpoint, "avg_bits": 2.875, "bit_widths": [2, 3, 4],
                                            "rotate": True, "store": "s3://secret-bucket",
                                            "dense_override": ["*.o_proj=8"]},
                  quantization_config=qc, summaries=SUMMARIES, evaluation=EVAL, source_card=source, **kw)
    (tmp_path / "README.md").write_text(text)
    return ModelCard.load(tmp_path / "README.md"), text


def test_a_hub_source_is_the_base_model_and_its_license_carries_over(tmp_path):
    source = "---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE\nbase_model: x/y\n---\n# m\n"
    parsed, text = card(tmp_path, "hf://org/moe@0123abc", source, model_type="mixtral")
    meta = parsed.data.to_dict()
    assert meta["base_model"] == "org/moe" and meta["base_model_relation"] == "quantized"
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "my-license", "LICENSE")
    assert meta["library_name"] == "expertbits" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["moe", "quantized", "expertbits", "mixed-precision", "2-bit", "3-bit", "4-bit", "mixtral"]
    assert "| 0 | 4 | 2 | 1 | 1 | 2.750 |" in text and "| 1 | 4 | 2 | 0 | 2 | 3.000 |" in text
    assert "| KL(fp ‖ quantized) per token | 0.01230 |" in text
    assert "--checkpoint hf://org/moe@0123abc" in text and "--rotate" in text and "secret-bucket" not in text
    assert "--dense-override '*.o_proj=8'" in text  # quoted: pasted into a shell, the glob stays a glob
    assert 'LLM(model="path/to/this/folder")' in text


def test_other_sources_name_no_base_model_and_a_packed_head_says_vllm_refuses(tmp_path):
    parsed, text = card(tmp_path, "s3://models/moe", None, qc={**QC, "dense_modules": {"lm_head": {"bits": 8}}},
                        lm_eval="| task | metric |\n|---|---|\n| t | acc |\n")
    assert "base_model" not in parsed.data.to_dict() and "license" not in parsed.data.to_dict()
    assert "names no `base_model`" in text and "vLLM refuses this folder: its head is packed" in text
    assert "### lm-evaluation-harness\n\n| task | metric |" in text
    assert source_license("---\nlicense: [unclosed\n---\n") == {}  # a broken source card carries nothing
    assert source_license("# no front matter\nlicense: mit\n") == {}
    assert source_license("---\nlicense: [mit, apache-2.0]\n---\n") == {}  # not one string: not carried
