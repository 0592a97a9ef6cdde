#!/usr/bin/env bash
# One-command demo on a fresh machine: installs what bootcache needs, builds
# it, then runs the demo (scripts/demo.js) on the built-in default: the real
# Debian 12 boot trace shipped in test/data/. Arguments go to the demo
# (--keep keeps its files, --help says what it does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
npm run --silent build >/dev/null
exec node scripts/demo.js "$@"
