#!/usr/bin/env bash
# Install imgsift into .venv: the shared package, the four services, the `imgsift` command
# and the test tools, at the versions in constraints.txt. Safe to run again.
#   PYTHON=python3.11          the interpreter for the venv (3.11 or newer)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   CPU-only torch wheels (smaller)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" -c constraints.txt --index-url "$TORCH_INDEX_URL" torch torchvision
fi
"${PIP[@]}" -c constraints.txt \
  -e common -e services/crawler -e 'services/detector[openvino,onnx]' -e 'services/siamese[efficientnet,openvino,onnx]' -e services/api -e cli -e clients/python \
  -r requirements-dev.txt

# The UI test drives Debian's Chromium through Playwright (a browser download fails offline).
# Installed where this runs as root with apt; elsewhere that test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q chromium >/dev/null 2>&1 || echo "install.sh: could not install chromium; the UI test will skip" >&2
fi

# The SQL job-state tests run on a PostgreSQL 15 server of their own (tests/conftest.py
# starts it from Debian's binaries in a temp dir, never the machine's own server). Installed
# where this runs as root with apt; elsewhere those tests skip and say why.
if [ ! -x /usr/lib/postgresql/15/bin/initdb ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q postgresql >/dev/null 2>&1 || echo "install.sh: could not install postgresql; the PostgreSQL tests will skip" >&2
fi

# tests/deploy checks the KEDA ScaledObjects with @kubernetes-models/keda, pinned by
# tools/keda/package-lock.json and installed into .tools/keda (not committed). Best effort:
# without it the KEDA tests fail where node is installed and skip where it is not.
if command -v npm >/dev/null 2>&1; then
  if ! cmp -s tools/keda/package-lock.json .tools/keda/installed-lock.json \
    || [ ! -f .tools/keda/node_modules/@kubernetes-models/keda/package.json ]; then
    mkdir -p .tools/keda
    cp tools/keda/package.json tools/keda/package-lock.json .tools/keda/
    if npm ci --prefix .tools/keda --no-audit --no-fund --loglevel=error; then
      cp tools/keda/package-lock.json .tools/keda/installed-lock.json
    else
      echo "install.sh: npm could not install tools/keda; the KEDA tests will fail" >&2
    fi
  fi
else
  echo "install.sh: npm not found; tools/keda not installed, so the KEDA tests fail (or skip without node)" >&2
fi
