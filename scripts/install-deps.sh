#!/usr/bin/env bash
# install-deps.sh: installs what keel needs to build and test on Debian 12 (bookworm).
#
# Idempotent and fast on a warm machine: when every package is already installed it neither
# updates the package lists nor calls apt-get install. Run as root, or as a user with sudo.
set -euo pipefail

packages=(
    build-essential
    cmake
    ninja-build
    pkg-config
    clang
    clang-format
    libclang-rt-14-dev # the sanitizer runtimes clang links against
    libjansson-dev
    libcmocka-dev
    libxgboost-dev
    xgboost         # the xgboost command line: the tests train small models with it
    liblinear-tools # ships examples/heart_scale, the tests' training data
    libmicrohttpd-dev  # HTTP for keel serve
    libyajl-dev        # streaming JSON for infer bodies (numbers as raw text)
    python3-jsonschema # integration tests validate responses against the V2 OpenAPI schemas
    python3-yaml
    prometheus         # promtool check metrics
    libopencv-dnn-dev  # the onnx backend (OpenCV DNN 4.6)
    libonnx-testdata   # ONNX conformance data for the onnx backend's tests
    curl
    libturbojpeg0-dev   # JPEG decoding in the preprocessing workers
    libspng-dev         # PNG decoding in the preprocessing workers
    libjemalloc-dev     # the keel program's allocator: memory flat over reloads (PERFORMANCE.md)
    libjpeg-turbo-progs # djpeg: the JPEG decoding reference in test_workers
    libpng-dev          # ships examples/pngtest.png (interlaced), a PNG reference image
    python3-pil         # the PNG decoding reference; test images for test_preprocess_http
    python-matplotlib-data # grace_hopper.jpg, the JPEG reference image
)

missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "install-deps: all ${#packages[@]} packages already installed"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "install-deps: missing packages (${missing[*]}); run this script as root" >&2
    exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq "${missing[@]}"
echo "install-deps: done"
