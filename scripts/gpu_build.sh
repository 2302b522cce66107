#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (ModelOpt, in .whl/) and make the full-size
# random pi05_libero checkpoint; then run the commands of docs/PERFORMANCE.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site; fi
[ -d checkpoints/pi05_libero ] || python3 -m pi_build.cli.build checkpoint --config pi05 --horizon 10 --dtype bfloat16 --out checkpoints/pi05_libero
