#!/usr/bin/env bash
# MathJax 3 from the npm registry into a local folder, for tests/test_pages.py (the book's pages are checked offline:
# the site's MathJax and the one its plotly figures name both come from a CDN the test machine cannot reach).
# The folder is $KDBOOK_MATHJAX, by default ~/.cache/kdbook/mathjax-<version>; the test looks in the same place.
set -euo pipefail
VERSION="${MATHJAX_VERSION:-3.2.2}"
DEST="${KDBOOK_MATHJAX:-${XDG_CACHE_HOME:-$HOME/.cache}/kdbook/mathjax-$VERSION}"
if [ -f "$DEST/es5/tex-chtml-full.js" ] && [ -f "$DEST/es5/tex-svg.js" ]; then
  echo "MathJax $VERSION is at $DEST"; exit 0
fi
command -v npm >/dev/null || { echo "npm is needed to fetch MathJax (apt-get install npm)" >&2; exit 1; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "mathjax@$VERSION" >/dev/null)
mkdir -p "$DEST.partial"
tar -xzf "$tmp"/mathjax-*.tgz -C "$DEST.partial" --strip-components=1
rm -rf "$DEST"; mv "$DEST.partial" "$DEST"
echo "MathJax $VERSION is at $DEST"
