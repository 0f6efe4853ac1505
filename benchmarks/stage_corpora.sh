#!/usr/bin/env bash
# Copy the demo family's corpus cache (made by a `make demo` here) to out/corpora, so a machine that
# cannot download (the GPU one) builds the same family: carry out/corpora, MESWITCH_CACHE points there.
# WordNet (the fifth domain, 28 MB) is left out to stay under the 64 MiB carry limit.
set -euo pipefail
src=${MESWITCH_CACHE:-$HOME/.cache/meswitch/corpora}
[ -d "$src" ] || { echo "no corpus cache at $src: run 'make demo' (or meswitch demo-family) first" >&2; exit 1; }
rm -rf out/corpora && mkdir -p out/corpora/debian
for d in python-stdlib fortunes-en fortunes-zh; do cp -r "$src/$d" out/corpora/; done
for d in fortunes fortunes-min fortunes-zh; do cp -r "$src/debian/$d" out/corpora/debian/; done
du -sh out/corpora
