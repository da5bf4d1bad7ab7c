#!/usr/bin/env bash
# mypy over the installed layout: the folders protos/, edge/, cloud/, federated/ are the
# subpackages tandemspec.protos, ... (pyproject's package-dir), which mypy cannot see
# through an editable install. Build a tree of symlinks that has the installed shape.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree="$root/build/typecheck"
rm -rf "$tree"
mkdir -p "$tree/tandemspec"
for entry in "$root"/tandemspec/*; do
  ln -s "$entry" "$tree/tandemspec/$(basename "$entry")"
done
for sub in protos edge cloud federated; do
  ln -s "$root/$sub" "$tree/tandemspec/$sub"
done
cd "$tree"
exec mypy --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" -p tandemspec
