#!/usr/bin/env bash
# Create .venv at the repository root with the pinned CPU torch and the package (+ test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned, so nothing pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# espeak-ng and wordnet-base make real speech for the codec and data tests, chromium drives the web page's
# end-to-end test, a C compiler builds the CPU decode kernels; tests that need them skip without them.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[[ -d /usr/share/wordnet ]] || missing+=(wordnet-base)
if ((${#missing[@]})) && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null 2>&1 \
    || echo "setup: could not install ${missing[*]}; tests that need them will skip" >&2
fi
