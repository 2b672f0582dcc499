"""Run in vLLM's own environment (infra/vllm_env.sh): serve an expertbits folder with vLLM as a
user does, `LLM(model=folder)` and no other quantization flag, and save what it computed.

    <vllm python> tests/support/vllm_worker.py FOLDER JOB.json OUT.pt

JOB: {"score": [[token ids], ...], "generate": [[token ids], ...], "max_new_tokens": 16, "llm": {more LLM
arguments, none of them about quantization}}.
OUT: {"logprobs": [[L-1, V] float32 per scored prompt: position i's log-probabilities of token i+1],
      "generated": [[token ids] per generated prompt], "vllm": version}.
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file again
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    folder, job, out = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
    # float32 for comparisons to float rounding; the CPU's memory share is this machine's setting, not the model's
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_logprobs=-1, max_model_len=512,
              gpu_memory_utilization=0.3, **job.get("llm", {}))
    scored = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["score"]],
                          SamplingParams(prompt_logprobs=-1, max_tokens=1, temperature=0.0))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    logprobs = []
    for o in scored:
        rows = o.prompt_logprobs[1:]  # the first position has no prediction
        lp = torch.full((len(rows), vocab), float("-inf"))
        for i, row in enumerate(rows):
            ids = torch.tensor(list(row))
            lp[i, ids] = torch.tensor([v.logprob for v in row.values()])
        logprobs.append(lp)
    generated = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["generate"]],
                             SamplingParams(max_tokens=job["max_new_tokens"], temperature=0.0))
    torch.save({"logprobs": logprobs, "generated": [list(o.outputs[0].token_ids) for o in generated],
                "vllm": vllm.__version__}, out)
    # the engine's processes stopped first, then this one without its C++ destructors: vLLM's exit
    # aborts on some models here (DeepSeek-V3: "terminate called without an active exception")
    # after everything is written
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    import os

    os._exit(0)
