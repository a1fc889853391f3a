#!/usr/bin/env bash
# setup.sh: the Debian packages the benchmarks need beyond scripts/install-deps.sh (which
# covers building and testing keel). Only bench/ uses these; CI does not install them.
#   wrk, hyperfine       HTTP load and command timing (bench/http.sh, bench/suite.sh)
#   valgrind             callgrind instruction counts (bench/callgrind.sh, suite.sh ir)
#   python3-fastapi python3-uvicorn python3-uvloop python3-httptools python3-xgboost
#   python3-numpy        the FastAPI peer (bench/fastapi_peer.py), under /usr/bin/python3;
#                        uvloop and httptools are uvicorn's fast event loop and HTTP parser
set -euo pipefail
packages=(wrk hyperfine valgrind python3-fastapi python3-uvicorn python3-uvloop python3-httptools
    python3-xgboost python3-numpy)
missing=()
for pkg in "${packages[@]}"; do
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" == installed ]] ||
        missing+=("$pkg")
done
((${#missing[@]} == 0)) && { echo "bench/setup.sh: all ${#packages[@]} packages installed"; exit 0; }
sudo=()
[[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
