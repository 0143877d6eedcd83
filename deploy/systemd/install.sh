#!/usr/bin/env bash
# Install the CXR-BMD screener as a systemd service. Run as root; safe to run again (an
# upgrade: the venv is reused and the package reinstalled, the unit files are replaced, an
# existing configuration is left alone).
set -euo pipefail

PREFIX="/opt/cxr-bmd-screener"
VENV="$PREFIX/venv"
CONFIG_DIR="/etc/cxr-bmd-screener"
CONFIG="$CONFIG_DIR/screener.toml"
DATA_DIR="/var/lib/cxr-bmd-screener"
UNIT_DIR="/etc/systemd/system"
SYSUSERS_DIR="/etc/sysusers.d"
TMPFILES_DIR="/etc/tmpfiles.d"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SOURCE="$(cd "$HERE/../.." && pwd)"   # the repository this script belongs to
PYTHON="${PYTHON:-python3}"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--python PYTHON] [SOURCE]

Install the CXR-BMD screener as the systemd service cxr-bmd-screener (run as root):

  1. python3 -m venv $VENV (kept if it exists), then
     pip install SOURCE into it: SOURCE is a source tree (default: $SOURCE, the repository
     this script is in), a wheel or sdist, or anything else pip accepts;
  2. the unit        -> $UNIT_DIR/cxr-bmd-screener.service
     the system user -> $SYSUSERS_DIR/cxr-bmd-screener.conf   (user and group "screener")
     the folders     -> $TMPFILES_DIR/cxr-bmd-screener.conf   ($CONFIG_DIR, $DATA_DIR)
     then systemd-sysusers and systemd-tmpfiles --create for those two files;
  3. $CONFIG from config.example.toml with data_dir = "$DATA_DIR",
     only if there is none yet (an existing configuration is never overwritten).

It does not run systemctl (which may not work in a container). Afterwards:

  screener check-config $CONFIG   # after editing it ($VENV/bin/screener)
  systemctl daemon-reload
  systemctl enable --now cxr-bmd-screener

Options:
  --python PYTHON  interpreter for the venv (default: \$PYTHON or python3). Use the system's
                   python3 (3.11 or newer): the service cannot see /home or /root
                   (ProtectHome=yes), so an interpreter there would not start.
  -h, --help       this text
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --python) [ $# -ge 2 ] || { echo "--python needs a value" >&2; exit 2; }; PYTHON="$2"; shift 2 ;;
        --python=*) PYTHON="${1#--python=}"; shift ;;
        --) shift; break ;;
        -*) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
[ $# -le 1 ] || { echo "one SOURCE at most (see --help)" >&2; exit 2; }
if [ $# -eq 1 ]; then
    SOURCE="$1"
fi
# A local path as an absolute one: pip reads a bare "name" as a package to fetch from an index.
if [ -e "$SOURCE" ]; then
    SOURCE="$(readlink -f "$SOURCE")"
fi

[ "$(id -u)" -eq 0 ] || { echo "run as root (it writes to /opt, /etc and /var/lib)" >&2; exit 1; }
for tool in systemd-sysusers systemd-tmpfiles; do
    command -v "$tool" >/dev/null || { echo "$tool not found: this installs a systemd service" >&2; exit 1; }
done
command -v "$PYTHON" >/dev/null || { echo "$PYTHON not found" >&2; exit 1; }
interpreter="$(readlink -f "$(command -v "$PYTHON")")"
case "$interpreter" in
    /home/*|/root/*|/run/user/*)
        echo "warning: $interpreter is under /home, /root or /run/user, which the service cannot see" \
             "(ProtectHome=yes); use the system python3 (--python /usr/bin/python3)" >&2 ;;
esac

echo "== venv $VENV"
mkdir -p "$PREFIX"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --upgrade "$SOURCE"
[ -x "$VENV/bin/screener" ] || { echo "$VENV/bin/screener missing after pip install $SOURCE" >&2; exit 1; }

echo "== systemd files"
install -D -m 0644 "$HERE/cxr-bmd-screener.service" "$UNIT_DIR/cxr-bmd-screener.service"
install -D -m 0644 "$HERE/cxr-bmd-screener.sysusers" "$SYSUSERS_DIR/cxr-bmd-screener.conf"
install -D -m 0644 "$HERE/cxr-bmd-screener.tmpfiles" "$TMPFILES_DIR/cxr-bmd-screener.conf"
systemd-sysusers "$SYSUSERS_DIR/cxr-bmd-screener.conf"
systemd-tmpfiles --create "$TMPFILES_DIR/cxr-bmd-screener.conf"

echo "== configuration $CONFIG"
if [ -e "$CONFIG" ]; then
    echo "$CONFIG exists: left as it is"
else
    example="$HERE/../../config.example.toml"
    [ -f "$example" ] || example="$SOURCE/config.example.toml"
    [ -f "$example" ] || { echo "config.example.toml not found next to $HERE or in $SOURCE" >&2; exit 1; }
    grep -q '^data_dir = ' "$example" || { echo "$example has no data_dir line to set" >&2; exit 1; }
    tmp="$(mktemp "$CONFIG_DIR/.screener.toml.XXXXXX")"
    trap 'rm -f "$tmp"' EXIT
    sed "s|^data_dir = .*|data_dir = \"$DATA_DIR\"|" "$example" > "$tmp"
    chown root:screener "$tmp"
    chmod 0640 "$tmp"
    mv "$tmp" "$CONFIG"
    trap - EXIT
    echo "$CONFIG written from $example (data_dir = \"$DATA_DIR\")"
fi
"$VENV/bin/screener" check-config "$CONFIG" >/dev/null || { echo "$CONFIG does not pass check-config" >&2; exit 1; }

cat <<EOF

Installed. Edit $CONFIG ([node] bind_address, allowed_calling_aes, [[destinations]]), check it
with $VENV/bin/screener check-config $CONFIG, then start the service:

  systemctl daemon-reload
  systemctl enable --now cxr-bmd-screener

and follow it with: journalctl -u cxr-bmd-screener -f
EOF
