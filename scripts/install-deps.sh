#!/usr/bin/env bash
# Installs what normkit's build, tests, benchmarks and examples use, from Debian's
# packages. The library itself needs only Eigen 3.4; everything else is for us.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  build-essential cmake ninja-build pkgconf python3 python3-matplotlib \
  libeigen3-dev libgtest-dev libbenchmark-dev \
  libdnnl-dev ocl-icd-opencl-dev libtorch-dev openmpi-bin libopenmpi-dev \
  clang libclang-rt-14-dev clang-tidy
