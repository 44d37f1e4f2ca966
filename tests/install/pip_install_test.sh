#!/usr/bin/env bash
# pip_install_test: `pip install bindings/python` into a fresh virtual environment (offline: the
# build backend, setuptools + wheel, comes from the system site-packages, which scripts/setup.sh
# fills from Debian), then the installed copy, run from outside the checkout, finds libllmq through
# LLMQ_LIBRARY and through the dynamic loader, and generates run.c's greedy tokens.
#
# usage: pip_install_test.sh PYTHON SOURCE_DIR MODEL_DIR LIBRARY
set -euo pipefail
python=$1 source=$2 model=$3 library=$4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"  # away from the checkout, whose bindings/python/llmq must not be the one imported

# From a copy: setuptools writes llmq.egg-info beside pyproject.toml, which must not land in the checkout.
cp -r "$source/bindings/python" "$tmp/package"
"$python" -m venv --system-site-packages "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --no-index --no-build-isolation --no-deps "$tmp/package"
venv_python=$tmp/venv/bin/python
LLMQ_LIBRARY="$library" "$venv_python" -c 'import llmq, sys; assert llmq.__file__.startswith(sys.prefix), llmq.__file__'

out=$(LLMQ_LIBRARY="$library" "$venv_python" "$source/examples/python/generate.py" "$model" "Once upon a time" 8)
grep -qx "ids: 432 383 286 261 376 298 315 421" <<<"$out" || { echo "pip_install_test: printed: $out"; exit 1; }
echo "pip_install_test: LLMQ_LIBRARY: run.c's tokens"

found=$(env -u LLMQ_LIBRARY LD_LIBRARY_PATH="$(dirname "$library")" \
  "$venv_python" -c 'import llmq; print(llmq.library_path)')
[ "$found" = libllmq.so.0 ] || { echo "pip_install_test: found $found, not the loader's libllmq.so.0"; exit 1; }
echo "pip_install_test: the dynamic loader: found libllmq.so.0"
echo "pip_install_test: passed"
