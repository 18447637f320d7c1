#!/usr/bin/env bash
# ONNX Runtime's C/C++ headers for the CPU custom-op library, into DIR (default build/onnxruntime-dev).
# No PyPI wheel ships them; Debian trixie's libonnxruntime-dev (1.21, API 21) does. On an older Debian
# the package is downloaded with a private apt configuration (the system's own mirror, suite trixie,
# signatures checked with the system keyring) and unpacked with dpkg -x: nothing is installed.
set -euo pipefail
DIR=$(realpath -m "${1:-build/onnxruntime-dev}")
HDR="$DIR/usr/include/onnxruntime/onnxruntime_cxx_api.h"
[ -f "$HDR" ] && exit 0
command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "needs apt-get and dpkg (Debian/Ubuntu)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial"
SRC=/etc/apt/sources.list.d/debian.sources
if [ -f "$SRC" ]; then  # the first stanza (the main archive), suite -> trixie
  awk 'BEGIN{RS="";ORS="\n\n"} NR==1' "$SRC" | sed -E 's/^Suites:.*/Suites: trixie/' > "$WORK/trixie.sources"
else
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$WORK/trixie.sources"
fi
OPTS=(-q -o "Dir::Etc::sourcelist=$WORK/trixie.sources" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$WORK/lists"
      -o "Dir::Cache=$WORK/cache" -o APT::Sandbox::User=root)
apt-get "${OPTS[@]}" update > "$WORK/update.log" 2>&1 || { tail -3 "$WORK/update.log" >&2; exit 1; }
(cd "$WORK" && apt-get "${OPTS[@]}" download libonnxruntime-dev > download.log 2>&1) || { tail -3 "$WORK/download.log" >&2; exit 1; }
rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp"
dpkg -x "$WORK"/libonnxruntime-dev_*.deb "$DIR.tmp"
[ -f "$DIR.tmp/usr/include/onnxruntime/onnxruntime_cxx_api.h" ] || { echo "libonnxruntime-dev has no onnxruntime_cxx_api.h" >&2; exit 1; }
rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
