#!/usr/bin/env bash
# The inputs of benchmarks/serve_load.py: a random-weight sglora-tiny bundle adapting the last block, built
# through the real export path (needs torch: the server side), and 2,000 photos of the world (every 8th file
# of its sorted photo images).   usage: bash benchmarks/serve_load_inputs.sh [OUT=/tmp/serve-load] [WORLD=runs/world]
set -euo pipefail
out=${1:-/tmp/serve-load}
world=${2:-runs/world}
python -c "from pathlib import Path; from export.synthetic import build_bundle; \
print(build_bundle(Path('$out'), 'open_clip:sglora-tiny@random', 'minilm', 1)[0])"
mkdir -p "$out/gallery"
find "$world/images/photo" -name '*.png' | sort | awk 'NR % 8 == 1' | head -2000 | \
    while read -r f; do cp "$f" "$out/gallery/$(basename "$(dirname "$f")")_$(basename "$f")"; done
ls "$out/gallery" | wc -l
