#!/usr/bin/env bash
# Regenerate the pictures of docs/report.md from the repository root: the HTML report merging two runs of every
# method camloc runs on tiny-vit (24) on the demo set, and `camloc explain --method all`, each seen in headless
# Chromium in a 1,400 px wide window (the script fails if a page is wider than the window). Tiny random-init
# models: the pictures show the views, nothing about CLIP.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_WAIT_POLICY=PASSIVE
runs=runs/screenshots
shots=docs/screenshots
rm -rf "$runs"
mkdir -p "$runs"
for threshold in otsu 0.5; do
    camloc eval --dataset demo --model tiny-vit --method all --protocols box,mask-iou,pointing,maxboxacc,pxap \
        --threshold "$threshold" --out "$runs/threshold-$threshold" --no-progress > /dev/null
done
camloc report "$runs"/threshold-* --html "$runs/report.html" > /dev/null
camloc explain camloc/datasets/demo/images/astronaut.jpg --prompt "a person" --prompt "a tie" --method all \
    --model tiny-vit --out "$runs/explain_all.png" > /dev/null
printf '<!DOCTYPE html><html><body style="margin:8px"><img src="explain_all.png"></body></html>\n' > "$runs/explain.html"
chrome() {
    chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
        --disable-component-update --disable-sync --user-data-dir="$runs/profile" "$@" 2> /dev/null
}
for page in report explain; do
    # the page's width as the browser lays it out, against the window's
    sed 's|</body>|<script>document.title = "width " + document.documentElement.scrollWidth + " " + window.innerWidth</script></body>|' \
        "$runs/$page.html" > "$runs/$page-probe.html"
    chrome --window-size=1400,1000 --dump-dom "file://$(pwd)/$runs/$page-probe.html" \
        | python -c "import re, sys; w, win = map(int, re.search(r'<title>width (\d+) (\d+)<', sys.stdin.read()).groups()); print('$page: page', w, 'px in a', win, 'px window'); sys.exit(w > win)"
done
chrome --window-size=1400,1900 --screenshot="$runs/report.png" "file://$(pwd)/$runs/report.html"
chrome --window-size=1400,1650 --screenshot="$runs/explain.png" "file://$(pwd)/$runs/explain.html"
python - "$runs" "$shots" <<'PY'
import sys
from pathlib import Path

from PIL import Image

runs, shots = map(Path, sys.argv[1:])
Image.open(runs / "report.png").convert("RGB").save(shots / "report.png", optimize=True)
Image.open(runs / "explain.png").convert("RGB").save(shots / "explain_all.jpg", quality=85)
PY
