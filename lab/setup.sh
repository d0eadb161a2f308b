#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 machine, run as root (the Makefile calls it).
# First run: installs the Debian packages the lab needs and a virtual environment with the
# project. Later runs only check, and print "setup: ok".
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(bind9 bind9-utils bind9-dnsutils unbound strongswan-charon strongswan-swanctl
      strongswan-pki libcharon-extra-plugins libstrongswan-extra-plugins
      libstrongswan-standard-plugins iproute2 iputils-ping tcpdump dnsperf procps
      systemd-container debootstrap prometheus)
# systemd-container + debootstrap: the service tests boot a real systemd in a container
# (lab/nspawn.py); prometheus: its `promtool check metrics` checks our metrics output.

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
    # We want promtool, not a Prometheus server: on a machine run by systemd, the package
    # would start one on port 9090.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
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
# The Debian tree the service tests boot (cached in /var/cache/ipseckey-resolver; rebuilt
# only when missing or when lab/nspawn.py's package list changed). Needs the registries, so
# it is built here, before any lab is up.
.venv/bin/python -m lab.nspawn ensure || echo "setup: WARNING: the service tests' Debian tree" \
    "could not be built (is a lab up? it blackholes the registries); they will fail" >&2
echo "setup: ok"
