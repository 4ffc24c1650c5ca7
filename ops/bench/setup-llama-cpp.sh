#!/usr/bin/env bash
# Sets up the Python venv with llama-cpp-python used as baseline (a) of `ferry bench inference` (runs llama_cpp_bench.py).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
VENV="${FERRY_BENCH_VENV:-$HOME/.cache/ferry/bench-venv}"
# Build llama.cpp on one core by default so the machine keeps a core free.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-1}"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}"

log() { echo "[setup-llama-cpp] $*" >&2; }

# One setup at a time on this machine (the same lock directory as
# ferry-stack's install::once): a second caller waits, then finds it done.
LOCK_DIR="${FERRY_LOCK_DIR:-$HOME/.cache/ferry/locks}"
mkdir -p "$LOCK_DIR"
exec 9>"$LOCK_DIR/bench-venv.lock"
flock 9

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv at $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
else
    log "venv already present at $VENV"
fi

if "$VENV/bin/python" -c "import llama_cpp" >/dev/null 2>&1; then
    log "llama_cpp already importable: $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    exit 0
fi

log "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (compiles llama.cpp; CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL CMAKE_ARGS=$CMAKE_ARGS; this can take 10-20 minutes)"
start=$(date +%s)
"$VENV/bin/python" -m pip install --upgrade pip >&2
"$VENV/bin/python" -m pip install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
"$VENV/bin/python" -c "import llama_cpp" >&2
log "installed llama-cpp-python $("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)') in $(( $(date +%s) - start ))s"
