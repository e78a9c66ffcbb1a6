#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh serve [toolkit serve options]   set up, export the default model on first run, serve it
#   ./dev.sh test  [pytest options]          set up, run the whole test suite (what CI runs)
# Set-up is a virtual environment in .venv (override with TOOLKIT_VENV) holding the CPU build of
# torch 2.13.0 and this project with its cpu, test extras. Re-running it is quick.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TOOLKIT_VENV:-.venv}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$VENV/.toolkit-installed" ] || [ pyproject.toml -nt "$VENV/.toolkit-installed" ]; then
        echo "==> installing dependencies into $VENV (first run: a few minutes)"
        "$VENV/bin/pip" install --quiet --upgrade pip
        # torch first and pinned: the CPU build; anything unpinned could pull a multi-GB CUDA build.
        "$VENV/bin/pip" install --quiet "torch==2.13.0"
        "$VENV/bin/pip" install --quiet -e ".[cpu,test]"
        touch "$VENV/.toolkit-installed"
    fi
}

case "${1:-}" in
    serve)
        shift
        setup
        exec "$VENV/bin/toolkit" serve "$@"
        ;;
    test)
        shift
        setup
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh serve [options] | ./dev.sh test [pytest options]" >&2
        exit 2
        ;;
esac
