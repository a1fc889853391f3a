#!/usr/bin/env bash
# install-deps.sh: installs the Debian 12 (bookworm) packages keel needs.
#
#   scripts/install-deps.sh          what building and running keel needs (the example,
#                                    scripts/run-example.sh, uses only these)
#   scripts/install-deps.sh --test   those plus what the tests need (scripts/test.sh)
#
# Packages are installed with --no-install-recommends: the lists below are complete without
# recommendations. Idempotent and fast on a warm machine: when every package is already
# installed it neither updates the package lists nor calls apt-get install. Run as root, or
# as a user with sudo.
set -euo pipefail

usage() {
    echo "usage: $0 [--test]" >&2
    exit 2
}
with_tests=0
for arg in "$@"; do
    case "$arg" in
    --test) with_tests=1 ;;
    -h | --help)
        echo "usage: $0 [--test]   (--test: also the packages the tests need)"
        exit 0
        ;;
    *) usage ;;
    esac
done

# Building and running keel (and the example: curl sends its HTTP request).
packages=(
    build-essential
    cmake
    ninja-build
    pkg-config
    libjansson-dev
    libxgboost-dev     # the xgboost backend
    libopencv-dnn-dev  # the onnx backend (OpenCV DNN 4.6)
    libmicrohttpd-dev  # HTTP for keel serve
    libsystemd-dev     # sd_notify: keel serve as a Type=notify systemd service
    protobuf-compiler  # protoc: compiles keel's model_config.proto (config.pbtxt)
    libprotobuf-dev    # protobuf's TextFormat and JSON printer (src/repository/pbtxt.cpp)
    libgrpc-dev        # gRPC's C core (keel serve --grpc-port)
    libprotobuf-c-dev  # protobuf-c: the gRPC messages
    protobuf-c-compiler # protoc-c: generates them from src/server/proto at build time
    libyajl-dev        # streaming JSON for infer bodies (numbers as raw text)
    libturbojpeg0-dev  # JPEG decoding in the preprocessing workers
    libspng-dev        # PNG decoding in the preprocessing workers
    libjemalloc-dev    # the keel program's allocator (flat RSS over reloads)
    libssl-dev         # libcrypto's SHA-256: the model check remembers files that passed
    curl
)

# The tests: scripts/test.sh's stages and ctest.
test_packages=(
    git                # the fresh stage clones the repository
    clang
    clang-format
    libclang-rt-14-dev # the sanitizer runtimes clang links against
    libcmocka-dev
    xgboost            # the xgboost command line: the tests train small models with it
    liblinear-tools    # ships examples/heart_scale, the tests' training data
    python3
    python3-jsonschema # integration tests validate responses (tests/schema)
    prometheus         # promtool check metrics
    libonnx-testdata   # ONNX conformance data for the onnx backend's tests
    libjpeg-turbo-progs    # djpeg: the JPEG decoding reference in test_workers
    libpng-dev             # ships examples/pngtest.png (interlaced), a PNG reference image
    python3-pil            # the PNG decoding reference; test images for test_preprocess_http
    python-matplotlib-data # grace_hopper.jpg, the JPEG reference image
    nginx-light            # test_tls_proxy: TLS in front of keel, as docs/OPERATIONS.md shows
    openssl                # test_tls_proxy: the self-signed certificate, made at test time
    systemd                # systemd-analyze verify of packaging/keel.service (test_systemd)
    python3-yaml           # test_deploy, test_deploy_files: the KServe and Prometheus YAML
    python3-grpcio         # test_grpc: the gRPC client
    python3-grpc-tools     # test_grpc: stubs generated from keel's .proto at test time
)
if ((with_tests)); then
    packages+=("${test_packages[@]}")
fi

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
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: done"
