#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the package with Airflow.
# The environment lives in a cache keyed by pyproject.toml and the Python version, so a fresh
# clone reuses it safely; .venv in the repo is a link to it. The project itself is always
# reinstalled in editable mode so the venv points at *this* checkout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python_bin=""
for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    python_bin="$(command -v "$candidate")"; break
  fi
done
[ -n "$python_bin" ] || { echo "bootstrap: Python 3.11+ is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

# mysqlclient (the mysql extra) compiles against the MySQL client headers.
if ! pkg-config --exists mysqlclient 2>/dev/null && ! pkg-config --exists libmariadb 2>/dev/null; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing MySQL client headers (default-libmysqlclient-dev) for mysqlclient"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-libmysqlclient-dev pkg-config >/dev/null
  else
    echo "bootstrap: the MySQL client headers are missing; install default-libmysqlclient-dev and pkg-config (Debian) or libmysqlclient-dev (Ubuntu) and rerun" >&2
    exit 1
  fi
fi

py_version="$("$python_bin" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$( (cat pyproject.toml; echo "$py_version") | sha256sum | cut -c1-16)"
cache_root="${SELFHEAL_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/airflow-selfheal}"
venv="$cache_root/venv-$key"

if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (Airflow and friends, about 2 minutes the first time)"
  rm -rf "$venv"
  mkdir -p "$cache_root"
  "$python_bin" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >/dev/null
  "$venv/bin/pip" install -q -e ".[dev,postgres,mysql,sqlite]"
  touch "$venv/.complete"
fi
# Point the editable install at this checkout (cheap; the dependencies are already there).
"$venv/bin/pip" install -q --no-deps -e . >/dev/null
ln -sfn "$venv" .venv
echo "bootstrap: ready ($("$venv/bin/python" -c 'import airflow; print("Airflow", airflow.__version__)'))"
