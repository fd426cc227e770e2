#!/usr/bin/env bash
# One entry point for a fresh clone:  bash run.sh demo   |   bash run.sh test
# Creates (or reuses) .venv, installs the package with its test extras, installs Debian's
# Fashion-MNIST when it is missing and apt is available, then runs the demo or the tests.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # Ray 2.60 turns token auth on for new clusters

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 0
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && "$PY" -m venv "$VENV"; }
  fi
  # Reinstall only when pyproject.toml changed since the last install.
  local stamp="$VENV/.micl-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    touch "$stamp"
  fi
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    apt_install dataset-fashion-mnist || echo "warning: could not install dataset-fashion-mnist" >&2
  fi
}

case "${1:-}" in
  demo)
    setup
    shift
    exec "$VENV/bin/python" pipelines/pretrain.py "$@"
    ;;
  test)
    setup
    shift
    "$VENV/bin/python" -m ruff check .
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash run.sh demo [pretrain args] | test [pytest args] | setup" >&2
    exit 2
    ;;
esac
