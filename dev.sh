#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh serve [toolkit serve options]   set up, export the default model on first run, serve it
#   ./dev.sh test  [pytest options]          set up, run the whole test suite (what CI runs)
# Set-up is a virtual environment in .venv (override with TOOLKIT_VENV) holding the CPU build of
# torch 2.13.0 and this project with its cpu, test extras (test also installs the ray extra, for
# the Ray Serve tests; serve stays without it). Re-running it is quick.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TOOLKIT_VENV:-.venv}"

setup() {
    local extras="$1" marker="$VENV/.toolkit-installed-${1//,/-}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV"
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$marker" ] || [ pyproject.toml -nt "$marker" ]; then
        echo "==> installing dependencies into $VENV (first run: a few minutes)"
        "$VENV/bin/pip" install --quiet --upgrade pip
        # torch first and pinned: the CPU build; anything unpinned could pull a multi-GB CUDA build.
        "$VENV/bin/pip" install --quiet "torch==2.13.0"
        "$VENV/bin/pip" install --quiet -e ".[$extras]"
        touch "$marker"
    fi
}

case "${1:-}" in
    serve)
        shift
        setup "cpu,test"
        exec "$VENV/bin/toolkit" serve "$@"
        ;;
    test)
        shift
        setup "cpu,test,ray"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: ./dev.sh serve [options] | ./dev.sh test [pytest options]" >&2
        exit 2
        ;;
esac
