#!/usr/bin/env bash
# Build the node's container image with buildah (as root; `--isolation chroot`; Docker format,
# which keeps the HEALTHCHECK: the OCI format has no place for it).
#
#   deploy/container/build.sh [--base IMAGE] [--tag NAME] [--torch "torch==X torchvision==Y"]
#                             [--ca-cert FILE]...
#
# --ca-cert: an extra CA certificate (PEM) to trust inside the image, e.g. the site proxy's
# that pip must go through to reach PyPI; may be given several times.
# --base: the base image. Default: docker.io/library/debian:bookworm-slim if it can be pulled,
# else a Debian 12 base made here from Debian packages with debootstrap (kept in
# /var/tmp/screener-base and imported as localhost/screener-debian-base).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tag="localhost/cxr-bmd-screener:latest"
base=""
torch=""
cas="$here/ca-certificates"
rm -f "$cas"/*.crt
while [ $# -gt 0 ]; do
    case "$1" in
        --ca-cert) cp "$2" "$cas/$(basename "${2%.*}").crt"; shift 2 ;;
        --base) base="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --torch) torch="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

debian_base() {
    local name="localhost/screener-debian-base:bookworm" root=/var/tmp/screener-base/rootfs
    if buildah inspect --type image "$name" >/dev/null 2>&1; then echo "$name"; return; fi
    if [ ! -x "$root/usr/bin/python3" ]; then
        echo "making a Debian 12 base with debootstrap (a few minutes)..." >&2
        rm -rf "$root"; mkdir -p "$root"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
            bookworm "$root" http://deb.debian.org/debian >&2
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    fi
    local ctr
    ctr=$(buildah from scratch)
    buildah copy "$ctr" "$root" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --rm "$ctr" "$name" >&2
    echo "$name"
}

if [ -z "$base" ]; then
    if buildah pull --quiet docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
        base=docker.io/library/debian:bookworm-slim
    else
        base="$(debian_base)"
    fi
fi
echo "base image: $base" >&2
start=$(date +%s)
buildah bud --isolation chroot --format docker --layers=false -f "$here/Containerfile" \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_SPEC="$torch" -t "$tag" "$repo" >&2
echo "built $tag in $(( $(date +%s) - start )) s; size $(buildah images --format '{{.Size}}' "$tag" | head -1)" >&2
echo "$tag"
