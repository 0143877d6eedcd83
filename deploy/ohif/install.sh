#!/usr/bin/env bash
# Install the prebuilt OHIF Viewer (npm package @ohif/app, its dist/ folder) into a folder:
#
#   deploy/ohif/install.sh [DEST]
#
# DEST defaults to $SCREENER_OHIF_DIST, else ~/.cache/cxr-bmd-screener/ohif-<version>. Only the
# package's own tarball is fetched (`npm pack`): dist/ is self-contained, none of the
# package's build dependencies are needed to serve it. Serve DEST with deploy/ohif/app-config.js
# as its app-config.js and /dicom-web/ passed on to Orthanc (see docs/viewers.md).
set -euo pipefail
OHIF_VERSION="3.13.2"
DEST="${1:-${SCREENER_OHIF_DIST:-$HOME/.cache/cxr-bmd-screener/ohif-$OHIF_VERSION}}"
if [ -f "$DEST/index.html" ] && [ -f "$DEST/.ohif-version" ] && [ "$(cat "$DEST/.ohif-version")" = "$OHIF_VERSION" ]; then
    echo "OHIF $OHIF_VERSION already in $DEST"
    exit 0
fi
command -v npm >/dev/null || { echo "npm not found: apt-get install npm" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
tar -xzf "$work"/ohif-app-"$OHIF_VERSION".tgz -C "$work" package/dist
[ -f "$work/package/dist/index.html" ] || { echo "@ohif/app@$OHIF_VERSION has no dist/index.html" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$work/package/dist" "$DEST"
echo "$OHIF_VERSION" > "$DEST/.ohif-version"
echo "OHIF $OHIF_VERSION installed in $DEST"
