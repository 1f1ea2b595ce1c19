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
# The config file as a positional argument and no logo where this import-linter takes them (2.17's: a fresh clone's
# `bash scripts/test.sh` printed a DeprecationWarning of --config and a 10-line ASCII logo until round 53); else
# --config, as import-linter 2.1 takes it.
PYTHONPATH="$tree" exec "${PYTHON:-python3}" -c "
import sys
from importlinter.cli import lint_imports_command as command
names = {p.name for p in command.params}
sys.argv[0] = 'lint-imports'
if 'config_files' in names:
    sys.argv[1:3] = [sys.argv[2]] + (['--no-logo'] if 'no_logo' in names else [])
sys.exit(command())" --config "$repo/.importlinter" --no-cache "$@"
