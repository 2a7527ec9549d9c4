#!/usr/bin/env bash
# Installs the Debian 12 packages nolad needs to build, test and run.
# Safe to run repeatedly: apt is only called when something is missing.
set -euo pipefail

packages=(libpq-dev libopenblas-dev libjpeg-dev libpng-dev libsystemd-dev libcurl4-openssl-dev pkg-config postgresql lintian)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}" >&2
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's postgresql package may start a cluster of its own through its init scripts; nolad never uses it.
if ! command -v swift >/dev/null; then
    echo "deps: swift is not on PATH; install Swift 6 for Linux (swift.org) and try again" >&2
    exit 1
fi
