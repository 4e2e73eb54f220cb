#!/usr/bin/env bash
# Issue 5's two measurements through a real Airflow (see benchmarks/README.md); about 10 minutes on
# 2 cores. Run after `bash scripts/bootstrap.sh`. Each benchmark starts its own Airflow stack (waiting
# while another one runs on this machine) and removes everything it created.
# Exit status: 1 if a benchmark found wrong data, 2 if one could not measure, else 0 (slow is not a failure).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -x .venv/bin/python ] || { echo "bench: no .venv here; run 'bash scripts/bootstrap.sh' first" >&2; exit 2; }
bash scripts/ensure_databases.sh

status=0
run() {
  echo "== $*"
  .venv/bin/python -m "$@"
  local rc=$?
  if [ "$rc" -gt "$status" ]; then status=$rc; fi
}
run benchmarks.catch_up_speed
run benchmarks.engine_profile
run benchmarks.catch_up_fairness
exit "$status"
