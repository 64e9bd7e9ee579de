#!/usr/bin/env bash
# The main job: sets up ./.venv, builds seft_ext, runs the CPU benchmarks of the kernels and
# of the evolution engine (until the `seft` fine-tuning driver lands, this is the job).
# Extra arguments go to bench_ops.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python bench/bench_ops.py "$@"
python bench/bench_evolution.py --quick
