"""--device: what a request resolves to on this machine, the errors for a device it does not have,
what the keys see, the memory estimate of a streamed stage, and the compute dtype plumbing that a
GPU uses, run here on the CPU (tests/gpu/ compares the CUDA results with these)."""

import math

import pytest
import torch

from expertbits.tasks.errors import ExpertbitsError
from expertbits.tasks.placement import CPU, ENV, Placement, check, gpu_dtype, key, require_free, resolve, resolved

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only host")


@no_cuda
def test_auto_and_cpu_are_one_placement_on_a_cpu_only_host(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve("auto") == resolve("cpu") == CPU == Placement("cpu", "float32", "cpu")
    # the flow resolves auto once and passes the result: the same keys in every process
    assert resolved("auto") == resolved("cpu") == "cpu" and key(resolved("auto")) == key("cpu") == ["cpu", "float32"]
    # the model's dtype does not change the CPU's: it computes in float32, as it always has
    assert resolve("auto", {"dtype": "bfloat16"}) == CPU


@no_cuda
@pytest.mark.parametrize("request_", ["cuda", "cuda:0", "cuda:3"])
def test_a_device_this_machine_lacks_is_refused_naming_it_and_the_fix(request_):
    for fn in (resolve, resolved):
        with pytest.raises(ExpertbitsError) as e:
            fn(request_)
        assert f"--device {request_}: this machine has no CUDA device" in e.value.problem
        assert "--device cpu" in e.value.fix and e.value.option == "device"


@no_cuda
def test_the_flow_runs_environment_says_what_auto_means_there(monkeypatch):
    monkeypatch.setenv(ENV, "cpu")
    assert resolve("auto") == CPU and resolved("auto") == "cpu"
    monkeypatch.setenv(ENV, "cuda:1")  # a job variable naming a GPU this machine lacks: refused, not ignored
    for fn in (resolve, resolved):
        with pytest.raises(ExpertbitsError, match="--device cuda:1: this machine has no CUDA device"):
            fn("auto")
    assert resolve("cpu") == CPU and resolved("cpu") == "cpu"  # an explicit request wins over the environment
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        resolve("auto")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CUDA", "cpu:0", "", "mps"])
def test_a_malformed_device_is_refused_by_the_parameters(bad):
    from pydantic import ValidationError

    from expertbits.flows.params import LeagueParams, QuantizeParams

    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        check(bad)
    for params in (QuantizeParams, LeagueParams):
        with pytest.raises(ValidationError, match="device"):
            params(device=bad)
    assert QuantizeParams().device == "auto" and QuantizeParams(device=" cuda:1 ").device == "cuda:1"


def test_a_gpu_computes_in_the_dtype_the_model_is_stored_in():
    assert gpu_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert gpu_dtype({"torch_dtype": "float16"}) == "float16"
    assert gpu_dtype({"torch_dtype": "torch.float32"}) == "float32"
    assert gpu_dtype({}) == gpu_dtype(None) == gpu_dtype({"dtype": "float8_e4m3fn"}) == "bfloat16"


def test_keys_come_from_the_resolved_name_alone_and_never_from_auto():
    require_free(CPU, 1 << 60, "a stage")  # the host's memory is the meter's business
    # no hardware is queried: a CPU flow host and a GPU worker compute the same key for "cuda"
    assert key("cuda") == key("cuda:1") == ["cuda", "model-dtype"] != key("cpu")
    with pytest.raises(ValueError, match="resolved device"):
        key("auto")
    a = Placement("cuda:0", "bfloat16", "NVIDIA H100 80GB HBM3")
    assert a.summary() == {"device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16"} and CPU.summary()["device"] == "cpu"
    assert str(a) == "cuda:0 (NVIDIA H100 80GB HBM3, bfloat16)" and str(CPU) == "cpu"


def test_the_meter_reports_no_gpu_memory_where_cuda_was_never_used():
    from expertbits.tasks.meter import Meter

    with Meter() as m:
        torch.ones(1000).sum()
    assert "peak_gpu_bytes" in m.figures()
    if not torch.cuda.is_initialized():
        assert m.figures()["peak_gpu_bytes"] is None


def test_device_bytes_counts_what_a_streamed_stage_holds(micro_pair):
    """The estimate from the headers, against the parts counted independently: the tiny model's
    non-expert weights are kept (under KEEP_BYTES), one expert, Hessians for GPTQ, activations, logits."""
    import json

    from safetensors import safe_open

    from expertbits.tasks.model.streaming import device_bytes

    _, ft = micro_pair
    cfg = json.loads((ft / "config.json").read_text())
    hidden, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    other = 0
    for f in ft.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            other += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys() if ".experts." not in k)
    expert = 3 * hidden * ffn
    windows, seq = 4, 64
    acts = 4 * windows * seq * (12 * hidden + 3 * ffn) + 4 * cfg["num_attention_heads"] * windows * seq * seq
    for dtype in (torch.float32, torch.bfloat16):
        plain = device_bytes(ft, dtype, windows, seq, head=False)
        assert plain == (other + expert) * dtype.itemsize + acts
        assert device_bytes(ft, dtype, windows, seq, head=True) - plain == 2 * 4 * windows * seq * vocab
        gptq = device_bytes(ft, dtype, windows, seq, head=False, hessians=True)
        big = max(hidden, ffn)  # kernels/gptq.py's copies of the larger Hessian, the fp64 error measurement's
        assert gptq - plain == 4 * expert + 4 * (hidden ** 2 + ffn ** 2) + 16 * big ** 2 + 8 * (big ** 2 + hidden * ffn)


def test_a_bf16_stream_computes_what_the_fp32_one_does_to_bf16_rounding(micro_pair):
    """The dtype plumbing a GPU takes (weights cast where they land, inputs moved, log-probs back on
    the host in fp32), on the CPU: bf16 against fp32 on the same windows."""
    from expertbits.tasks.measure.evaluate import all_log_probs
    from expertbits.tasks.model.streaming import streamed
    from expertbits.zoo import text_path

    from expertbits.tasks.checkpoints.texts import text_examples

    _, ft = micro_pair
    tok, pairs = text_examples(ft, text_path("code-heldout").read_text(), 64, 2, False)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        with streamed(ft, dtype=dtype, device="cpu") as model:
            out[dtype] = all_log_probs(model, pairs, tok.pad_token_id, "cpu")
    for p, q in zip(out[torch.float32], out[torch.bfloat16]):
        assert q.dtype == torch.float32 and q.device.type == "cpu"
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        assert 0 < kl < 5e-3  # bf16 differs, a little


def test_validation_refuses_a_process_whose_kernels_run_elsewhere_than_the_flow_decided():
    from expertbits.tasks.stages.stage_io import kernel_device, same_kernels

    same_kernels(kernel_device())
    with pytest.raises(ExpertbitsError, match="the flow validates them on cuda:NVIDIA H100") as e:
        same_kernels("cuda:NVIDIA H100" if kernel_device() == "triton-interpreter" else "triton-interpreter")
    assert "same accelerator" in e.value.fix
