#!/usr/bin/env bash
# Builds Sluice's container image with podman, from a Debian 12 base made
# here by debootstrap (no image registry needed):
#
#   deploy/image/build.sh SLUICE_BIN LIBONNXRUNTIME [MODELS_DIR]
#
# 1. localhost/sluice-base:bookworm: `debootstrap --variant=minbase` plus
#    libssl3 and ca-certificates, without apt's caches, docs and locales;
#    built once, then reused.
# 2. localhost/sluice:<version>: the base + the stripped release binary +
#    ONNX Runtime's CPU library (deploy/image/Containerfile, target sluice).
# 3. localhost/sluice:<version>-minilm, when MODELS_DIR holds
#    all-minilm-l6-v2: the same with the model baked in.
#
# Prints the images and their sizes. Idempotent: a second run rebuilds only
# the application layers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?usage: build.sh SLUICE_BIN LIBONNXRUNTIME [MODELS_DIR]}
ort=${2:?usage: build.sh SLUICE_BIN LIBONNXRUNTIME [MODELS_DIR]}
models=${3:-}
cache=${SLUICE_IMAGE_CACHE:-$HOME/.cache/sluice/image}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export CONTAINERS_CONF=$here/containers.conf
version=$("$bin" --version | awk '{print $2}')

base=localhost/sluice-base:bookworm
if ! podman image exists "$base"; then
  rootfs=$cache/rootfs
  if [ ! -e "$rootfs/.sluice-base" ]; then
    rm -rf "$rootfs"
    mkdir -p "$cache"
    debootstrap --variant=minbase --include=libssl3,ca-certificates bookworm "$rootfs" "$mirror"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    touch "$rootfs/.sluice-base"
  fi
  tar -C "$rootfs" --exclude=./.sluice-base --exclude=./proc/* --exclude=./sys/* --exclude=./dev/* -c . \
    | podman import --change 'CMD ["/bin/bash"]' - "$base"
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/sluice"
strip "$ctx/sluice"
cp -L "$ort" "$ctx/libonnxruntime.so"
podman build --quiet --target sluice -f "$here/Containerfile" -t "localhost/sluice:$version" -t localhost/sluice:latest "$ctx" >/dev/null
if [ -n "$models" ] && [ -d "$models/all-minilm-l6-v2" ]; then
  mkdir -p "$ctx/models"
  # Only the default version (1, fp32): the int8 one is opt-in.
  mkdir -p "$ctx/models/all-minilm-l6-v2"
  cp -r "$models/all-minilm-l6-v2/1" "$ctx/models/all-minilm-l6-v2/"
  podman build --quiet --target minilm -f "$here/Containerfile" -t "localhost/sluice:$version-minilm" -t localhost/sluice:latest-minilm "$ctx" >/dev/null
fi
podman images --filter reference='localhost/sluice*' --format '{{.Repository}}:{{.Tag}} {{.Size}}'
