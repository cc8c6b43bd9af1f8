#!/usr/bin/env bash
# Install Azurite (the Azure Storage emulator, npm) for the Azure ML registry tests.
# The tests look for it under $OLIVEFLOW_AZURITE_DIR (same default as here) and skip,
# saying why, when it is absent. 3.35.0 is the last release that declares node>=10
# (later ones want node>=22), so it installs cleanly on the node 20 CI images.
set -euo pipefail
prefix="${OLIVEFLOW_AZURITE_DIR:-$HOME/.cache/oliveflow-azurite}"
version="${AZURITE_VERSION:-3.35.0}"
if [ -x "$prefix/node_modules/.bin/azurite-blob" ] && \
   grep -q "\"version\": \"$version\"" "$prefix/node_modules/azurite/package.json" 2>/dev/null; then
  echo "azurite $version already in $prefix"
  exit 0
fi
mkdir -p "$prefix"
npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$version"
"$prefix/node_modules/.bin/azurite-blob" --version
echo "azurite $version installed in $prefix (export OLIVEFLOW_AZURITE_DIR=$prefix if that is not the default)"
