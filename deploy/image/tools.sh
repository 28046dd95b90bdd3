#!/usr/bin/env bash
# The container toolchain of `make image` and the image tests, from Debian's packages where it is
# missing (root only): podman (builds and runs the image, and `podman kube play`), runc (crun fails
# on some cgroup setups), catatonit (podman's pause process for pods), mmdebstrap (a base image
# from the package repository). Does nothing where the commands are there already.
set -euo pipefail
packages=(podman runc catatonit mmdebstrap)
missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
[[ -e /usr/libexec/podman/catatonit ]] || missing+=(catatonit)
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "missing: ${missing[*]}; install them (Debian/Ubuntu: apt-get install ${packages[*]})" >&2
  exit 1
fi
echo "installing ${packages[*]} from Debian's packages" >&2
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
