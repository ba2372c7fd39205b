#!/usr/bin/env bash
# Run promtool; when none is installed, take it from Debian's `prometheus` package into
# .tools/bin (downloaded and unpacked, never installed: no Prometheus service starts).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v promtool >/dev/null 2>&1; then exec promtool "$@"; fi
tool=.tools/bin/promtool
if [[ ! -x $tool ]]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "promtool: not installed, and no apt-get to fetch it (install Prometheus's promtool)" >&2
    exit 1
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    apt-get update -qq >/dev/null
    (cd "$tmp" && apt-get download prometheus >/dev/null)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p .tools/bin
  cp "$tmp/root/usr/bin/promtool" "$tool"
fi
exec "$tool" "$@"
