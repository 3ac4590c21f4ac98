#!/usr/bin/env bash
# Build llama-cpp-python 0.3.36 once (CPU, native) into a shared wheel cache and install it into the venv.
# Several jobs may run this at the same time: the first to create the lock dir (mkdir is atomic) builds,
# the others wait for the wheel. Usage: tests/export/install_llama_cpp.sh [python]
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
WHEELS=${GRAPHTUNE_WHEELS:-/root/.cache/graphtune/wheels}
LOCK="$WHEELS/.building"
mkdir -p "$WHEELS"
find_wheel() { ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1; }

if "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION' else 1)" 2>/dev/null; then
  exit 0
fi
if [ -z "$(find_wheel)" ]; then
  if mkdir "$LOCK" 2>/dev/null; then
    trap 'rm -rf "$LOCK" "$WHEELS/.tmp-$$"' EXIT
    echo "building llama_cpp_python==$VERSION (CPU, about 6 minutes on 2 cores)"
    TMP="$WHEELS/.tmp-$$"
    rm -rf "$TMP" && mkdir -p "$TMP"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
      "$PY" -m pip wheel --no-deps -w "$TMP" "llama_cpp_python==$VERSION"
    mv "$TMP"/llama_cpp_python-*.whl "$WHEELS"/   # a rename: waiters never see a partial wheel
    rm -rf "$TMP"
  else
    echo "another job is building llama_cpp_python ($LOCK exists); waiting for its wheel"
    waited=0
    while [ -z "$(find_wheel)" ]; do
      if [ ! -d "$LOCK" ] && [ -z "$(find_wheel)" ]; then
        echo "the other build ended without a wheel; run this script again to build it here" >&2; exit 1
      fi
      sleep 10; waited=$((waited + 10))
      if [ "$waited" -ge 3600 ]; then echo "gave up waiting for $LOCK after 1 h" >&2; exit 1; fi
    done
    while [ -d "$LOCK" ]; do sleep 2; done   # the wheel file may still be being written
  fi
fi
# llama-cpp-python's runtime deps (numpy, jinja2, diskcache, typing-extensions) resolve from the index
"$PY" -m pip install -q "$(find_wheel)"
