#!/usr/bin/env bash
# Check the import contracts of .importlinter with import-linter (pip install -e '.[dev]').
# import-linter follows packages on disk, but pyproject's package-dir maps server/, scheduler/ and client/
# into the `gpupool` package: mirror that mapping as a tree of symlinks and run lint-imports inside it.
# --help / -h: print this header (what the script does, its options) and exit, running nothing (round 48).
if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
  exit 0
fi
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d); trap 'rm -rf "$tree"' EXIT
mkdir "$tree/gpupool"
for f in "$repo"/gpupool/*; do
  case "$(basename "$f")" in __pycache__) ;; *) ln -s "$f" "$tree/gpupool/" ;; esac
done
ln -s "$repo/server" "$tree/gpupool/server"
ln -s "$repo/scheduler" "$tree/gpupool/scheduler"
ln -s "$repo/client" "$tree/gpupool/client"
cd "$tree"
# `python3 -c` rather than the lint-imports script: the same interpreter as the rest of scripts/test.sh.
PYTHONPATH="$tree" exec "${PYTHON:-python3}" -c "import sys; from importlinter.cli import lint_imports_command; sys.argv[0] = \"lint-imports\"; sys.exit(lint_imports_command())" --no-cache --config "$repo/.importlinter" "$@"
