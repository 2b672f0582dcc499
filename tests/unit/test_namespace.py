"""flows/, tasks/ and kernels/ install under expertbits.*, never as top-level import names.

`kernels` is Hugging Face's kernel hub package, which transformers probes for; if ours were
importable as `kernels`, transformers would try to use it.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_project_packages_live_under_the_namespace():
    for name in ("flows", "tasks", "kernels"):
        spec = importlib.util.find_spec(f"expertbits.{name}")
        assert spec is not None and Path(spec.origin).parent == REPO / name


def test_no_top_level_flows_tasks_or_kernels_from_this_project():
    # run outside the repo so the working directory is not on sys.path
    code = ("import importlib.util, json; "
            "print(json.dumps({n: (s.origin if (s := importlib.util.find_spec(n)) else None) for n in ('flows', 'tasks', 'kernels')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    for name, origin in __import__("json").loads(out).items():
        assert origin is None or not str(origin).startswith(str(REPO)), (name, origin)


def test_transformers_and_a_moe_model_still_work():
    code = """
import torch, transformers
from transformers.utils import is_kernels_available
from transformers import MixtralConfig, MixtralForCausalLM
import expertbits.kernels, expertbits.tasks, expertbits.flows
assert not is_kernels_available() or 'expertbits' not in str(__import__('kernels').__file__)
torch.manual_seed(0)
m = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()
with torch.no_grad():
    out = m(torch.arange(16)[None], output_router_logits=True)
assert out.logits.shape == (1, 16, 64) and torch.isfinite(out.logits).all()
print('ok', transformers.__version__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_importing_expertbits_changes_no_environment_or_triton_setting():
    """Import every package and run both kernels, in a fresh interpreter without TRITON_INTERPRET:
    the environment, Triton's interpret knob and triton.language's functions are as they were."""
    code = """
import os
before = dict(os.environ)
import triton, triton.language as tl
zeros = tl.zeros
import expertbits.flows.cli, expertbits.kernels, expertbits.tasks, expertbits.zoo
import expertbits.tasks.stages.quantize_tasks, expertbits.tasks.model.load
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert not triton.knobs.runtime.interpret
import torch
from expertbits.kernels.bank import ExpertBank
from expertbits.kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference, interpreted
from expertbits.kernels.fused_moe import fused_moe, fused_moe_reference
from expertbits.kernels.packing import quantize_rtn
torch.manual_seed(0)
q = quantize_rtn(torch.randn(24, 48), 3, 16)
x = torch.randn(3, 48)
assert interpreted() and torch.allclose(dequant_matmul(x, q), dequant_matmul_reference(x, q), atol=1e-5)
banks = [ExpertBank.stack([quantize_rtn(torch.randn(*s), b, 16) for b in (2, 4)]) for s in ((32, 48), (32, 48), (48, 32))]
idx, w = torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.rand(3, 2)
out, ref = fused_moe(x, idx, w, *banks), fused_moe_reference(x, idx, w, *banks)
assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-4
from concurrent.futures import ThreadPoolExecutor
with ThreadPoolExecutor(4) as pool:  # several threads launching at once (a Dask worker's threads)
    outs = list(pool.map(lambda i: dequant_matmul(x * i, q), range(8)))
assert all(torch.allclose(o, dequant_matmul_reference(x * i, q), atol=1e-4) for i, o in enumerate(outs))
assert dict(os.environ) == before and not triton.knobs.runtime.interpret and tl.zeros is zeros
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
