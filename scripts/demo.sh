#!/usr/bin/env bash
# Command 1 of the README: set everything up, then run the demo pipeline on SQLite (no server).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh
exec "$root/.venv/bin/python" scripts/run_demo.py "$@"
