#!/usr/bin/env bash
# Installs the Debian packages some tests drive, unless they are there already:
# chromium and chromium-driver (browser test), systemd (systemd-analyze verify of the unit files),
# curl (the README's examples), softhsm2 (a PKCS#11 token for the key-encryption key), postgresql (initdb and
# pg_ctl for the suite's throwaway cluster, and the unprivileged user postgres that runs it when the tests run as root),
# libexplain51 (needed by the ETSI GS QKD 004 client library of wg-qrotator's wheel, which drives our 004 server).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v curl >/dev/null || missing+=(curl)
[ -f /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && id postgres >/dev/null 2>&1 || missing+=(postgresql)
ls /usr/lib/*/libexplain.so.51 >/dev/null 2>&1 || missing+=(libexplain51)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "Installing Debian packages for the tests: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
