#!/usr/bin/env bash
# Installs the LIBERO simulator (hf-libero and the parts of its stack pi-build uses) into the
# given Python. Filled in by the LIBERO work; a no-op until then.
set -euo pipefail
PY=${1:-python3}
echo "install_libero: nothing to do yet" >&2
