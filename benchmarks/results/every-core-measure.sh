#!/bin/bash
# Before/after of "every core by default" on an otherwise idle machine:
#   benchmarks/results/every-core-measure.sh [BEFORE] [AFTER]
# BEFORE defaults to 2a777f3 (1 device by default, prefetcher copying on its thread),
# AFTER to HEAD. Each commit is checked out as a worktree under $SNAP (default: a temporary
# folder); outputs and times.txt go to $OUT (default runs/every_core). The 2026-12-01
# figures (every-core-2026-12-01.json) used AFTER=8f063a5, and a separate 600-step run at
# the final trainer for the one-step-in-flight row.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BEFORE=${1:-2a777f3}
AFTER=${2:-$(git -C "$REPO" rev-parse HEAD)}
PY=$REPO/.venv/bin/python
OUT=${OUT:-$REPO/runs/every_core}
SNAP=${SNAP:-$(mktemp -d)}
mkdir -p "$OUT"
git -C "$REPO" worktree add --detach "$SNAP/before" "$BEFORE" >/dev/null 2>&1
git -C "$REPO" worktree add --detach "$SNAP/after" "$AFTER" >/dev/null 2>&1
unset TGD_CPU_DEVICES XLA_FLAGS
export TGD_COMPILATION_CACHE=off   # every run compiles, like a first run
demo() {  # $1 = before|after
  cd "$SNAP/$1" || exit 1
  s=$(date +%s.%N)
  PYTHONPATH=$SNAP/$1 $PY reproduce.py --preset=demo --out="$OUT/demo_$1" > "$OUT/demo_$1.log" 2>&1
  echo "demo_$1 rc=$? wall_s=$(echo "$(date +%s.%N) - $s" | bc)" >> "$OUT/times.txt"
}
step() {  # $1 = before|after, $2 = label, extra env in $3
  cd "$SNAP/$1" || exit 1
  s=$(date +%s.%N)
  env $3 PYTHONPATH=$SNAP/$1 $PY train.py --config=configs/train.py:demo \
    --config.data.path="$OUT/demo_before/data/train.h5" --config.num_steps=600 \
    --config.eval_every=600 --config.log_every=100 --workdir="$OUT/step_$2" > "$OUT/step_$2.log" 2>&1
  echo "step_$2 rc=$? wall_s=$(echo "$(date +%s.%N) - $s" | bc)" >> "$OUT/times.txt"
}
demo before
step before before_default ""
step after after_default ""
step after after_1device "TGD_CPU_DEVICES=1"
demo after
git -C "$REPO" worktree remove --force "$SNAP/before"
git -C "$REPO" worktree remove --force "$SNAP/after"
echo finished >> "$OUT/times.txt"
