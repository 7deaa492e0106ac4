#!/usr/bin/env bash
# Build llama-cpp-python from its sdist into its own venv under bench/work/ (gitignored), for the GGUF
# benchmarks in bench/gguf.py and bench/gguf_generate.py. Never part of the default install or CI.
#
#   bench/build_llama.sh            # ~30+ min on a loaded 2-core machine
#
# Leaves:
#   bench/work/llama-venv/             a venv with llama_cpp (llama_model_quantize, Llama) + numpy
#   bench/work/llama-src/llama_cpp_python-<v>/vendor/llama.cpp/   the sdist's llama.cpp, which holds
#       convert_hf_to_gguf.py and gguf-py (run with the main venv's torch/transformers, PYTHONPATH=gguf-py)
#
# The build runs at nice 10 with one compile job so that other work on the machine keeps going.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WORK=bench/work
PY="${PYTHON:-python3}"
mkdir -p "$WORK/llama-src"

if [ ! -x "$WORK/llama-venv/bin/python" ]; then
  "$PY" -m venv "$WORK/llama-venv"
  "$WORK/llama-venv/bin/pip" install -q --upgrade pip
fi

SDIST_DIR="$WORK/llama-src/llama_cpp_python-$VERSION"
if [ ! -d "$SDIST_DIR" ]; then
  "$WORK/llama-venv/bin/pip" download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$WORK/llama-src"
  tar -xzf "$WORK/llama-src/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/llama-src"
fi

# Only the shared libraries the Python binding loads: no multimodal (mtmd), examples, tests, server or CURL.
export CMAKE_BUILD_PARALLEL_LEVEL=1
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON}"
nice -n 10 "$WORK/llama-venv/bin/pip" install -v "$SDIST_DIR"
"$WORK/llama-venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'quantize:', hasattr(llama_cpp, 'llama_model_quantize'))"
ls "$SDIST_DIR/vendor/llama.cpp/convert_hf_to_gguf.py"
