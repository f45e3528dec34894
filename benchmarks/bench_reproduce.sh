#!/usr/bin/env bash
# `noisejax reproduce` as whole processes from a fresh cache: an older commit against this checkout
# (issue 15's "reproduce >= 2x faster"), alternated, each with an empty NOISEJAX_CACHE and --out.
#
#   bash benchmarks/bench_reproduce.sh [BASE_COMMIT] [PAIRS]      (default: 5e9f899, 2 pairs)
#
# This checkout runs the experiments BASE_COMMIT has (a copy of experiments/ given by
# NOISEJAX_EXPERIMENTS_DIR; the others are reported missing), with the default --jobs 2 and with
# --jobs 1. Wall and CPU seconds of each process (/usr/bin/time) go to
# benchmarks/results/reproduce_cpu.txt; the claims of each run stay in $WORK/<run>/out.
# Run it on an idle machine: it takes 15-30 minutes per pair on a 2-core CPU.
set -euo pipefail
BASE=${1:-5e9f899}
PAIRS=${2:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench_reproduce.XXXXXX")
RESULTS="$HERE/benchmarks/results/reproduce_cpu.txt"
git -C "$HERE" worktree add -f "$WORK/base" "$BASE" >/dev/null
trap 'git -C "$HERE" worktree remove --force "$WORK/base" || true' EXIT
mkdir -p "$WORK/experiments"
cp -r "$HERE/experiments/_common.py" "$WORK/experiments/"
for d in "$WORK"/base/experiments/*/; do
  name=$(basename "$d")
  [[ -d "$HERE/experiments/$name" ]] && cp -r "$HERE/experiments/$name" "$WORK/experiments/"
done
one() {  # one TAG DIR [args]: a fresh process in DIR
  local tag=$1 dir=$2; shift 2
  local env=()
  [[ $tag == base* ]] || env=(NOISEJAX_EXPERIMENTS_DIR="$WORK/experiments")
  mkdir -p "$WORK/$tag"
  (cd "$dir" && env "${env[@]}" NOISEJAX_CACHE="$WORK/$tag/cache" /usr/bin/time -f "%e %U %S" \
     python -m noisejax reproduce --out "$WORK/$tag/out" "$@" >"$WORK/$tag/log" 2>&1)
  read -r wall user sys < <(tail -1 "$WORK/$tag/log")
  printf '%s %s wall_s=%s cpu_s=%s load=%s\n' "$(date -u +%FT%TZ)" "$tag" "$wall" \
    "$(echo "$user + $sys" | bc)" "$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$RESULTS"
}
for i in $(seq 1 "$PAIRS"); do
  one "base$i" "$WORK/base"
  one "jobs2_$i" "$HERE"
  one "jobs1_$i" "$HERE" --jobs 1
done
echo "runs in $WORK"
