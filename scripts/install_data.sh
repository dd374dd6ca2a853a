#!/usr/bin/env bash
# Debian packages holding the real data of the CPU benchmark: Fashion-MNIST (IDX) and the fonts the
# glyph dataset is rendered from. Needs root (or sudo). Safe to run again.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
PKGS="dataset-fashion-mnist fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf \
fonts-croscore fonts-cmu fonts-paratype fonts-go fonts-oldstandard fonts-texgyre fonts-linuxlibertine \
fonts-ebgaramond fonts-open-sans fonts-roboto-unhinted fonts-noto-core"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
echo "data packages installed: $PKGS"
