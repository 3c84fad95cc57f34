#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-quantize, llama-perplexity, llama-bench) from source, for
# scripts/bench_llama_cpp.py. The source comes from PyPI (llama-cpp-python's sdist vendors llama.cpp),
# so this works where only the package registries are reachable. CPU build, no server, no curl.
#
# Usage: bash scripts/build_llama_cpp.sh [DEST]   (default: build/llama.cpp; binaries in DEST/bin)
set -euo pipefail
VERSION=0.3.36
DEST=${1:-build/llama.cpp}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if [ -x "$DEST/bin/llama-perplexity" ] && [ -x "$DEST/bin/llama-quantize" ] && [ -x "$DEST/bin/llama-bench" ]; then
    echo "llama.cpp tools already built in $DEST/bin"; exit 0
fi
cd "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
tar xzf "llama_cpp_python-$VERSION.tar.gz"
SRC="llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF > cmake.log
cmake --build build -j "$(nproc)" --target llama-quantize llama-perplexity llama-bench > build.log
mkdir -p bin
cp build/bin/llama-quantize build/bin/llama-perplexity build/bin/llama-bench bin/
echo "built $(ls bin | tr '\n' ' ')in $DEST/bin"
