#!/usr/bin/env bash
# Sets up ./.venv, builds seft_ext, runs ruff and the test suite. Exit status is pytest's; "no tests
# collected" (pytest exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check python tests bench scripts   # lint first: a finding fails the run
set +e
python -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
