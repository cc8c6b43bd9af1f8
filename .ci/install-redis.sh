#!/usr/bin/env bash
# Install redis-server (Debian package) for the leased cross-host lock tests in tests/unit/test_locking.py.
# Idempotent. The tests skip, saying why, when redis-server is absent. Needs root for apt-get (sudo is used
# when available and we are not root).
set -euo pipefail
if command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ]; then
  echo "redis-server already installed: $(redis-server --version 2>/dev/null | head -1)"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
redis-server --version
