#!/usr/bin/env bash
# Smoke test of the node's container image, for real: build it (deploy/container/build.sh),
# run it (`buildah run --isolation chroot`, as root), C-ECHO it, C-STORE a real chest
# radiograph (pydicom-data's Philips CR) with DCMTK, and wait for the SR to arrive at a DCMTK
# storescp standing in for the PACS. Prints the build time, the image size and each step.
#
#   deploy/container/smoke.sh [--tag IMAGE]     # --tag: use an image already built
#
# Needs: buildah, debootstrap (when no base image can be pulled), DCMTK, python3 with pydicom-data.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tag=""
[ "${1:-}" = "--tag" ] && tag="$2"
[ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] && { sed -n '2,9p' "$0"; exit 0; }
work="$(mktemp -d /var/tmp/screener-smoke.XXXXXX)"
ctr=""
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$tag" ]; then
    start=$(date +%s)
    # The machine's own extra CAs (a TLS-inspecting proxy between it and PyPI), if any.
    cas=()
    for ca in /usr/local/share/ca-certificates/*.crt; do [ -f "$ca" ] && cas+=(--ca-cert "$ca"); done
    tag="$("$here/build.sh" "${cas[@]}")"
    echo "build: $(( $(date +%s) - start )) s"
fi
echo "image: $tag, $(buildah images --format '{{.Size}}' "$tag" | head -1)"
echo "healthcheck: $(buildah inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "$tag")"

# DCMTK's tools by absolute path: pyenv puts pynetdicom's apps of the same names first on PATH.
dcmtk=/usr/bin
for tool in storescp storescu echoscu dsrdump; do
    "$dcmtk/$tool" --version 2>&1 | grep dcmtk >/dev/null || { echo "FAIL: DCMTK $tool not in $dcmtk (apt-get install dcmtk)"; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dicom=$(free_port); health=$(free_port); pacs=$(free_port)
mkdir -p "$work/pacs"
"$dcmtk/storescp" --aetitle PACS --output-directory "$work/pacs" "$pacs" > "$work/pacs.log" 2>&1 &
pids+=($!)

cat > "$work/screener.toml" <<TOML
[node]
bind_address = "127.0.0.1"
port = $dicom
health_port = $health
[storage]
data_dir = "/data"
[model]
device = "cpu"
[dispatch]
interval_s = 0.5
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = $pacs
TOML
ctr=$(buildah from "$tag")
buildah copy --chown 10001:10001 "$ctr" "$work/screener.toml" /etc/cxr-bmd-screener/screener.toml >/dev/null
# buildah run shares the host's network here: the node listens on the loopback ports above.
buildah run --isolation chroot --user screener "$ctr" -- screener serve > "$work/node.log" 2>&1 &
pids+=($!)

deadline=$(( $(date +%s) + 180 ))
until "$dcmtk/echoscu" -aec CXRBMD 127.0.0.1 "$dicom" >/dev/null 2>&1; do
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "FAIL: no C-ECHO within 180 s"; tail -20 "$work/node.log"; exit 1; fi
    sleep 1
done
echo "C-ECHO: ok"
film="$(python3 -c 'from pydicom.data import get_testdata_file as f; print(f("RG1_UNCR.dcm"))')"
"$dcmtk/storescu" -aec CXRBMD 127.0.0.1 "$dicom" "$film"
echo "C-STORE: ok ($(basename "$film"))"
deadline=$(( $(date +%s) + 180 ))
until ls "$work/pacs" | grep -q '^SR'; do
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "FAIL: no SR at the PACS within 180 s"; tail -20 "$work/node.log"; exit 1; fi
    sleep 1
done
sr="$(ls "$work/pacs" | grep '^SR' | head -1)"
echo "SR at the PACS: $sr"
"$dcmtk/dsrdump" "$work/pacs/$sr" | grep -m3 -E 'Lumbar spine BMD|T-score|NOT FOR CLINICAL' || true
python3 -c "import json,urllib.request; d=json.load(urllib.request.urlopen('http://127.0.0.1:$health/health', timeout=10)); print('health:', d['status'], d['jobs'])"
echo "PASS"
