#!/usr/bin/env bash
# Installs the Debian packages apserve needs when they are missing: the Fashion-MNIST files, Prometheus, and
# on x86 SIMDe's headers (the tests build the AVX-512 kernels on them to run them without AVX-512).
set -euo pipefail
need=()
[ -f "${APSERVE_DATA_DIR:-/usr/share/datasets/fashion-mnist}/t10k-images-idx3-ubyte.gz" ] || need+=(dataset-fashion-mnist)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
if [ "$(uname -m)" = x86_64 ] && [ ! -f /usr/include/simde/x86/avx512.h ]; then need+=(libsimde-dev); fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "apserve needs the Debian packages: ${need[*]}, and this machine has no apt-get. Install them by hand." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else
    echo "apserve needs the Debian packages: ${need[*]}. Run as root, or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi
echo "installing Debian packages: ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
