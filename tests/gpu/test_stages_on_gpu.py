"""Every heavy stage on a CUDA device against the same stage on the CPU, within a stated tolerance
(`pytest -m gpu`; benchmarks/gpu_check.sh runs them). The micro pair is stored in float16; the
stage-level tests here place the GPU in float32 (`gpu()`), so differences are float rounding and
the order of sums (TF32 is off in torch by default for matmuls), not precision; the flow test
lets the dtype follow the model (float16).

Tolerances, and why:
* routing: the router's choices can flip only for near-ties: frequencies within 1/100 of every
  token, input moments within 1e-4 relative;
* RTN calibration error and RTN codes: the same grid from the same weights: errors within 1e-5
  relative, at most 1 code in 1000 differing (a weight exactly at a rounding boundary);
* GPTQ: the column updates accumulate in another order: output error within 5 % of the CPU's, and
  the quantized model's KL within 20 %;
* evaluation: KL within 5 % and perplexities within 1e-4 relative, the quantized model through the
  fused kernel on the GPU and the torch path on the CPU;
* the flow: `--device cuda` (float16, as the model is stored) publishes a run whose summaries name
  the GPU and whose KL is within 25 % of the CPU run's (float32).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from expertbits.tasks.placement import CPU, resolve  # noqa: E402
from expertbits.zoo import text_path  # noqa: E402

CAL = text_path("code-train").read_text()[:40_000]
HELD = text_path("code-heldout").read_text()[:40_000]


def gpu():
    return resolve("cuda", {"dtype": "float32"})


def uniform(bits: int) -> pd.DataFrame:
    return pd.DataFrame([{"layer": layer, "expert": e, "bits": bits} for layer in range(2) for e in range(4)])


def test_auto_is_the_gpu_and_a_missing_index_is_refused():
    from expertbits.tasks.errors import ExpertbitsError

    assert resolve("auto").is_cuda and resolve("auto").name == torch.cuda.get_device_name()
    with pytest.raises(ExpertbitsError, match=f"this machine has {torch.cuda.device_count()} CUDA device"):
        resolve(f"cuda:{torch.cuda.device_count()}")


def test_routing_on_the_gpu_is_the_cpus(micro_pair):
    from expertbits.tasks.allocation.calibrate import route

    _, ft = micro_pair
    cpu, m_cpu, _ = route(ft, CAL, seq_len=64, windows=8)
    cuda, m_cuda, _ = route(ft, CAL, seq_len=64, windows=8, placement=gpu())
    assert (cpu.frequency - cuda.frequency).abs().max() <= 0.01
    for layer in m_cpu:
        for e, moments in m_cpu[layer].items():
            if moments is not None and m_cuda[layer][e] is not None:
                assert torch.allclose(moments[0], m_cuda[layer][e][0], rtol=1e-4, atol=1e-6)


def test_rtn_errors_and_codes_on_the_gpu_are_the_cpus(micro_pair):
    from expertbits.tasks.allocation.calibrate import layer_errors, route
    from expertbits.tasks.checkpoints.reader import Checkpoint
    from expertbits.tasks.quantization.method import QuantizerConfig

    _, ft = micro_pair
    _, moments, _ = route(ft, CAL, seq_len=64, windows=4)
    with Checkpoint.open(ft) as ckpt:
        for clip in (False, True):
            q = QuantizerConfig(clip=clip)
            a = pd.DataFrame(layer_errors(ckpt, 0, moments[0], (2, 3, 4), 32, q))
            b = pd.DataFrame(layer_errors(ckpt, 0, moments[0], (2, 3, 4), 32, q, gpu()))
            for col in ("weight_error", "routed_input_error"):
                assert ((a[col] - b[col]).abs() <= 1e-5 * a[col].abs() + 1e-12).all()
            w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
            codes = q.round_matrix(w, 3, 32).packed, q.round_matrix(w.cuda(), 3, 32).packed.cpu()
            assert (codes[0] != codes[1]).float().mean() < 1e-3


def test_gptq_on_the_gpu_factorises_in_fp32_and_matches_the_cpu():
    from expertbits.kernels.gptq import gptq, output_error

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) / 16
    h, w = x.T @ x, torch.randn(384, 256, generator=g)
    cpu = output_error(w, gptq(w, h, 3, 64, act_order=True), h)
    q = gptq(w.cuda().bfloat16(), h.cuda(), 3, 64, act_order=True)  # bf16 weights in: fp32 inside
    assert q.packed.is_cuda
    assert abs(output_error(w, q.to("cpu"), h) - cpu) <= 0.05 * cpu


def test_sequential_gptq_and_evaluation_on_the_gpu_match_the_cpu(micro_pair, tmp_path):
    from expertbits.tasks.measure.evaluate import evaluate
    from expertbits.tasks.quantization.gptq_sequential import quantize_checkpoint_gptq
    from expertbits.tasks.quantization.method import QuantizerConfig

    _, ft = micro_pair
    out = {}
    for name, placement in (("cpu", CPU), ("cuda", gpu())):
        quantize_checkpoint_gptq(ft, uniform(2), 32, QuantizerConfig("gptq"), CAL, tmp_path / name, seq_len=64,
                                 windows=8, placement=placement)
        out[name] = {where: evaluate(ft, tmp_path / name, HELD, seq_len=64, windows=4, placement=p)
                     for where, p in (("cpu", CPU), ("cuda", gpu()))}
    assert abs(out["cuda"]["cpu"]["kl"] - out["cpu"]["cpu"]["kl"]) <= 0.2 * out["cpu"]["cpu"]["kl"]
    for name in out:  # one folder evaluated on both devices: the served fused kernel against the torch path
        c, g = out[name]["cpu"], out[name]["cuda"]
        assert abs(g["kl"] - c["kl"]) <= 0.05 * c["kl"]
        assert abs(g["ppl_fp"] - c["ppl_fp"]) <= 1e-4 * c["ppl_fp"]


def test_speed_is_measured_on_the_gpu(micro_pair, tmp_path):
    from expertbits.tasks.measure import speed
    from expertbits.tasks.quantization.writer import quantize_checkpoint

    _, ft = micro_pair
    quantize_checkpoint(ft, uniform(3), 32, tmp_path / "q")
    from expertbits.tasks.model.load import load

    model, _ = load(tmp_path / "q", dtype=torch.float32, device="cuda")
    figures = speed.compare(ft, model, gpu(), prompt=64, new=8)
    assert figures["device"] == torch.cuda.get_device_name()
    for model in ("quantized", "full_precision"):
        assert figures[model]["prefill_tokens_per_s"] > 0 and figures[model]["decode_tokens_per_s"] > 0


def test_the_meter_records_peak_gpu_memory():
    from expertbits.tasks.meter import Meter

    torch.zeros(1, device="cuda")
    with Meter() as m:
        t = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        del t
    assert m.figures()["peak_gpu_bytes"] >= 256 << 20


def test_a_stage_that_would_not_fit_says_so_before_it_starts():
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.placement import require_free

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ExpertbitsError, match="needs about .* GiB on cuda"):
        require_free(gpu(), free + (1 << 30), "the routing stage")


def test_kernel_validation_checks_every_row_on_the_gpu(micro_pair, tmp_path):
    from expertbits.tasks.checkpoints.reader import Checkpoint
    from expertbits.tasks.measure.kernel_check import validate_layer
    from expertbits.tasks.quantization.writer import quantize_checkpoint

    _, ft = micro_pair
    quantize_checkpoint(ft, uniform(3), 32, tmp_path / "q")
    with Checkpoint.open(ft) as src:
        part = validate_layer(tmp_path / "q", src, 0)
    assert part["device"] == torch.cuda.get_device_name() and not part["interpreted"]
    assert all(r["passed"] and r["kernel_rows"] == r["rows"] for r in part["rows"])  # every row, not a sample


@pytest.mark.integration
def test_the_flow_on_the_gpu(prefect_api, params):
    import json
    from pathlib import Path

    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    cpu = quantize_moe(QuantizeParams(**dict(params, device="cpu")))
    cuda = quantize_moe(QuantizeParams(**dict(params, device="cuda")))
    assert cuda.run_id != cpu.run_id  # a CPU result is never served to a GPU run
    ev = json.loads((Path(cuda.uri) / "evaluation" / "evaluation.json").read_text())
    ev_cpu = json.loads((Path(cpu.uri) / "evaluation" / "evaluation.json").read_text())
    assert ev["device"] == torch.cuda.get_device_name() and ev["dtype"] == "float16" and ev_cpu["device"] == "cpu"
    assert abs(ev["kl"] - ev_cpu["kl"]) <= 0.25 * ev_cpu["kl"]
    speed = json.loads((Path(cuda.uri) / "evaluation" / "throughput.json").read_text())
    assert speed["quantized"]["decode_tokens_per_s"] > 0
