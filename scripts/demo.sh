#!/usr/bin/env bash
# The main job on the embedded default: a tiny random pi0.5 checkpoint (with its own tokenizer and
# norm stats), its engines built on the CPU, then a short closed-loop LIBERO episode. The recipe is
# the folder's default (pi-build.toml names recipes/tiny.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d checkpoints/tiny ] || pi-build checkpoint --config pi05_tiny --horizon 10 --out checkpoints/tiny
pi-build all
pi-run libero --suite libero_spatial --tasks 0 --trials 1 --max-steps 20 --out runs/tiny_libero.json
