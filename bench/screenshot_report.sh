#!/usr/bin/env bash
# Screenshot a zquant HTML report in a real headless browser (Debian's chromium), to check that the
# page renders offline: no network, no GPU, a throw-away profile.
#
#   bash bench/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]
#
# Installs chromium with apt-get when it is missing (needs root, as on the project machines).
set -euo pipefail
page=${1:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]}
out=${2:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT]}
size=${3:-1280,2400}

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$out")"
url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
# --disable-quic/background-networking/component-update/sync: the page must need no network,
# and the browser should not try to reach one either.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$size" --screenshot="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")" "$url" 2>/dev/null
python3 - "$out" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h = struct.unpack(">II", data[16:24])
print(f"{sys.argv[1]}: {w} x {h} px, {len(data) / 1024:.0f} KiB")
PY
