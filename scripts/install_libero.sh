#!/usr/bin/env bash
# Installs the LIBERO simulator into the Python given as $1, headless and offline-ready:
#   bash scripts/install_libero.sh .venv/bin/python
#
# hf-libero (the packaged LIBERO: code, task files, initial states; no assets) declares training
# dependencies (wandb, robomimic, transformers, hydra: ~2.8 GB) that evaluation never imports, so
# it goes in with --no-deps next to the simulator stack it does use. LIBERO's benchmark module
# imports torch (to read the initial states); torch is not installed here: pi-build brings it.
# pip honours PIP_CONSTRAINT (the Makefile points it at .ci/constraints.txt, pinning the CPU torch).
# Running it again is quick: it only checks what is already there.
set -euo pipefail
PY=${1:?usage: bash scripts/install_libero.sh PYTHON}

# --- Headless OpenGL: EGL (Mesa's llvmpipe on a machine without a GPU), OSMesa as the fallback.
GL_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libosmesa6)
missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in "${GL_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
fi
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "install_libero: apt-get install ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "install_libero: warning: missing ${missing[*]}; install them as root for headless rendering" >&2
  fi
fi

# --- Python packages. Exact pins where LIBERO's code depends on an API; the rest as available.
LIBERO_PINS=(hf-libero==0.1.4 robosuite==1.4.0 bddl==1.0.1)
SIM_STACK=(mujoco==3.8.1 numba scipy pillow opencv-python-headless pyopengl matplotlib easydict
  future gymnasium cloudpickle termcolor tqdm pyyaml imageio imageio-ffmpeg)

# Quick path: every requirement already satisfied (checked through package metadata, no imports).
if "$PY" - "${LIBERO_PINS[@]}" "${SIM_STACK[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for requirement in sys.argv[1:]:
    name, _, pinned = requirement.partition("==")
    try:
        installed = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if pinned and installed != pinned:
        sys.exit(1)
EOF
then
  echo "install_libero: already installed in $PY" >&2
  exit 0
fi

# --no-warn-conflicts: pip would otherwise report the training dependencies left out on purpose.
"$PY" -m pip install -q --no-warn-conflicts --no-deps "${LIBERO_PINS[@]}"
"$PY" -m pip install -q --no-warn-conflicts "${SIM_STACK[@]}"
echo "install_libero: installed LIBERO into $PY" >&2
