#!/bin/sh
# Install the load generator (wrk) and the comparison proxy (nginx) used by
# python -m perf compare and scorecard (make perf-tools).  Idempotent: apt is only
# called for a tool that is missing.
#
# On Debian bookworm the package that ships /usr/sbin/nginx is `nginx`
# (`nginx-light` is a thin metapackage on top of it that adds an echo module
# we do not need).  Usage: sh perf/install-tools.sh   (needs root or sudo)
set -eu

need=""
command -v wrk >/dev/null 2>&1 || need="$need wrk"
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || need="$need nginx"

if [ -z "$need" ]; then
    echo "perf tools present: $(command -v wrk), $(command -v nginx || echo /usr/sbin/nginx)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install:$need" >&2; exit 1; }
    SUDO="sudo"
fi

echo "installing:$need"
$SUDO apt-get update -qq
# The nginx package's postinst tries to start the system service on :80; the
# benchmark never uses it, so stop it again if it came up (best effort).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
case "$need" in
    *nginx*)
        if [ -f /run/nginx.pid ]; then
            $SUDO /usr/sbin/nginx -s quit 2>/dev/null || true
        fi
        ;;
esac
command -v wrk >/dev/null 2>&1 || { echo "wrk still missing" >&2; exit 1; }
[ -x /usr/sbin/nginx ] || { echo "nginx still missing" >&2; exit 1; }
echo "perf tools installed"
