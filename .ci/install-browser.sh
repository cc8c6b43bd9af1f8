#!/usr/bin/env bash
# Install headless Chromium (Debian packages) and Playwright for Python (no browser download) for the
# UI test in tests/deploy/. Idempotent: does nothing when both are present. The test skips, saying why,
# when either is absent. Needs root for apt-get (sudo is used when available and we are not root).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
else
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null
  /usr/bin/chromium --version
fi

if "$python" -c "import playwright" 2>/dev/null; then
  echo "playwright already installed: $("$python" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
  # No `playwright install`: the tests launch /usr/bin/chromium (executable_path), nothing is downloaded.
  "$python" -m pip install -q playwright
  "$python" -m pip show playwright | sed -n 's/^Version: /playwright /p'
fi
