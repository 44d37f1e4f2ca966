#!/usr/bin/env bash
# Installs what llmq builds with from Debian packages, when missing. nvcc and GoogleTest come with
# the development image; the CUDA backend is compiled only when nvcc is found.
set -euo pipefail
packages=(cmake ninja-build g++ pkg-config nlohmann-json3-dev libfmt-dev libgtest-dev python3-numpy
  # llmq-sweep draws its PNG with gnuplot.
  gnuplot-nox
  # The bindings' tests: python3 with venv, and setuptools + wheel for an offline `pip install`.
  python3 python3-venv python3-setuptools python3-wheel)
# The Rust bindings' tests need cargo: a rustup toolchain when there is one, else Debian's (the
# crates are written for rustc 1.63, bookworm's).
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  packages+=(cargo)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# nvcc lives outside PATH on some images.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: nvcc found at /usr/local/cuda/bin (CMake picks it up from there)"
fi
