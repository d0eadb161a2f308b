#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine, run as root (the Makefile calls it).
# First run: installs the Debian packages the lab needs and a virtual environment with the
# project. Later runs only check, and print "setup: ok".
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(bind9 bind9-utils bind9-dnsutils unbound strongswan-charon strongswan-swanctl
      strongswan-pki libcharon-extra-plugins libstrongswan-extra-plugins
      libstrongswan-standard-plugins iproute2 iputils-ping tcpdump dnsperf procps)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (the lab creates network namespaces)" >&2
    exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    # --no-install-recommends is deliberately absent from the strongSwan plugins: they are
    # listed explicitly above, because the openssl plugin is only a Recommends.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
stamp=.venv/.installed
# Reinstall when pyproject.toml changed since the last install.
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: creating the virtual environment in .venv"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
echo "setup: ok"
