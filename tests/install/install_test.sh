#!/usr/bin/env bash
# install_test: `cmake --install` into a temporary prefix, then programs outside the tree built
# against the installed copy only: a C++ one through find_package(llmq) and llmq.hpp, a C one
# through pkg-config, and the installed llmq-generate. Each must give run.c's greedy tokens.
#
# usage: install_test.sh BUILD_DIR SOURCE_DIR MODEL_DIR   (env: CMAKE, CC, CXX, PKG_CONFIG)
set -euo pipefail
build=$1 source=$2 model=$3
cmake=${CMAKE:-cmake}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=$tmp/prefix
reference="432 383 286 261 376 298 315 421"

"$cmake" --install "$build" --prefix "$prefix" >/dev/null
library=$(find "$prefix" -name libllmq.so.0)
libdir=$(dirname "$library")
for f in include/llmq.h include/llmq.hpp bin/llmq-generate; do
  [ -e "$prefix/$f" ] || { echo "install_test: $f is not installed"; exit 1; }
done
for f in libllmq.so cmake/llmq/llmqConfig.cmake cmake/llmq/llmqConfigVersion.cmake pkgconfig/llmq.pc; do
  [ -e "$libdir/$f" ] || { echo "install_test: $libdir/$f is not installed"; exit 1; }
done
readelf -d "$library" | grep -q 'SONAME.*\[libllmq.so.0\]' ||
  { echo "install_test: SONAME is not libllmq.so.0"; exit 1; }

# find_package(llmq) from a C++ project.
"$cmake" -S "$source/tests/install" -B "$tmp/consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
"$cmake" --build "$tmp/consumer" >/dev/null
"$tmp/consumer/consumer_cmake" "$model"

# pkg-config from a C program.
flags=$(PKG_CONFIG_PATH="$libdir/pkgconfig" "${PKG_CONFIG:-pkg-config}" --cflags --libs llmq)
# shellcheck disable=SC2086  # flags are words
"${CC:-cc}" -std=c11 -Wall -Wextra -Werror -pedantic "$source/tests/install/consumer.c" $flags \
  -Wl,-rpath,"$libdir" -o "$tmp/consumer_pkgconfig"
"$tmp/consumer_pkgconfig" "$model"

# The installed llmq-generate finds its library through its RPATH ($ORIGIN/../lib).
out=$("$prefix/bin/llmq-generate" --model "$model" --prompt-ids "1 403 407 261 378" --temperature 0 \
  --max-tokens 8 --print-ids 2>/dev/null)
grep -qx "ids: $reference" <<<"$out" || { echo "install_test: llmq-generate printed: $out"; exit 1; }
echo "install_test: installed llmq-generate gives run.c's tokens"
echo "install_test: passed"
