#!/usr/bin/env bash
# `make image`: the suite's container image, built with podman from the bento (models baked in).
#
#   deploy/image/build.sh                      # here: on a base made locally from Debian's packages
#   BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm deploy/image/build.sh   # a machine with a registry
#   GPU=1 deploy/image/build.sh                # onnxruntime-gpu with CUDA/cuDNN wheels, tags *-gpu (untested here: no GPU)
#   deploy/image/build.sh loadtest             # `make image-loadtest`: locust + loadtest/ (deploy/loadtest)
#
# Needs no Docker engine and no registry: where BASE_IMAGE is a localhost/ name that podman does
# not have, the base is made from Debian's package repository with mmdebstrap. Prints the image
# tag last. Settings (environment): BASE_IMAGE, IMAGE (name, default model-suite), IMAGE_TAG (default
# the bento's version; `latest` is tagged too), BENTO (an existing bento tag instead of building one),
# BENTOML (the bentoml command), CA_BUNDLE (a CA file the build's downloads must trust; default the
# system bundle where one exists).
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE_IMAGE=${BASE_IMAGE:-localhost/model-suite-base:bookworm}
IMAGE=${IMAGE:-model-suite}
BENTOML=${BENTOML:-.venv/bin/bentoml}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/image/containers.conf}
export BENTOML_DO_NOT_TRACK=true
export BENTOML_HOME=${BENTOML_HOME:-$PWD/.bentoml}  # the store `make models` fills, as in the Makefile

deploy/image/tools.sh

if [[ $BASE_IMAGE == localhost/* ]] && ! podman image exists "$BASE_IMAGE"; then
  started=$(date +%s)
  rootfs=$(mktemp -d)/rootfs.tar
  # minbase: essential packages and apt; passwd for the image's user (BentoML's template runs
  # useradd); uv from this checkout's venv, so the build needs no pip install of uv; no manuals,
  # documentation or translations.
  mmdebstrap --variant=minbase --include=python3,passwd,ca-certificates --quiet \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="copy-in $(dirname "$(readlink -f "$BENTOML")")/uv /usr/local/bin" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$rootfs"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$rootfs" "$BASE_IMAGE" >/dev/null
  rm -rf "$(dirname "$rootfs")"
  echo "base image $BASE_IMAGE made in $(( $(date +%s) - started )) s" >&2
fi

# podman build options, also passed through `bentoml containerize --opt`.
build_options=("build-arg=BASE_IMAGE=$BASE_IMAGE" network=host)
if [[ -n ${GPU:-} ]]; then
  # onnxruntime-gpu, the version pyproject.toml's gpu extra pins; tags end in -gpu.
  ort_gpu=$(sed -n 's/.*"onnxruntime-gpu==\([^"]*\)".*/\1/p' pyproject.toml)
  build_options+=("build-arg=ONNXRUNTIME_GPU=$ort_gpu")
  suffix=-gpu
fi
if [[ -f $CA_BUNDLE ]]; then
  # The build's downloads (PyPI) trust this machine's CA bundle; nothing of it stays in the image.
  build_options+=("volume=$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro"
                  "build-arg=SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
fi
started=$(date +%s)

if [[ ${1:-suite} == loadtest ]]; then
  IMAGE=${IMAGE:-model-suite}-loadtest
  IMAGE_TAG=${IMAGE_TAG:-latest}
  context=$(mktemp -d)  # only what the image copies, not the checkout's venv and artifacts
  cp -r loadtest common "$context/"
  podman build --quiet "${build_options[@]/#/--}" -f deploy/image/loadtest.Containerfile \
    -t "$IMAGE:$IMAGE_TAG" "$context" >/dev/null
  rm -rf "$context"
  echo "image $IMAGE:$IMAGE_TAG built in $(( $(date +%s) - started )) s" >&2
  echo "$IMAGE:$IMAGE_TAG"
  exit 0
fi

BENTO=${BENTO:-$("$BENTOML" build --output tag | tail -n 1 | sed 's/^__tag__://')}
IMAGE_TAG=${IMAGE_TAG:-${BENTO#*:}}${suffix:-}
options=()
for option in "${build_options[@]}"; do options+=(--opt "$option"); done
# From the temporary folder: BentoML 1.4.39 renders a dockerfile_template only from under the
# working directory, and it copies the bento to a temporary folder first.
bentoml_command=$(readlink -f "$BENTOML")
(cd "${TMPDIR:-/tmp}" && "$bentoml_command" containerize "$BENTO" --backend podman --image-tag "$IMAGE:$IMAGE_TAG" --image-tag "$IMAGE:latest${suffix:-}" \
  "${options[@]}" >&2)
echo "image $IMAGE:$IMAGE_TAG built from $BENTO in $(( $(date +%s) - started )) s," \
  "$(podman image inspect --format '{{.Size}}' "$IMAGE:$IMAGE_TAG" | awk '{printf "%.0f MB", $1 / 1e6}')" >&2
echo "$IMAGE:$IMAGE_TAG"
