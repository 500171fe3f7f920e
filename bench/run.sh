#!/bin/sh
# Run the benchmark from anywhere: bench/run.sh [--full] [--reuse-port 2] ...
set -e
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
exec python -m bench "$@"
