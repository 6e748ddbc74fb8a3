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
# Check the result is a PNG of the window's size, then store it with a 256-colour palette (as
# zquant's plots are), which keeps the committed screenshot at a third of the size.
python3 - "$out" "$size" <<'PY'
import struct, sys
from PIL import Image
path, size = sys.argv[1], tuple(int(v) for v in sys.argv[2].split(","))
data = open(path, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "chromium wrote no PNG"
assert struct.unpack(">II", data[16:24]) == size, "screenshot size differs from the window size"
Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
with open(path, "rb") as f:
    print(f"{path}: {size[0]} x {size[1]} px, {len(f.read()) / 1024:.0f} KiB")
PY
