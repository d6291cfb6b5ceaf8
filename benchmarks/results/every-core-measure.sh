#!/bin/bash
# Before/after of "every core by default" on an idle machine.
# before: commit 2a777f3 (1 device by default, prefetcher copying on its thread)
# after:  the new default (every core), prefetcher copying on the main thread
set -u
PY=/work/main/.venv/bin/python
OUT=/work/main/runs/every_core
cd /work/main
[ -d /work/snap/before ] || git worktree add --detach /work/snap/before 2a777f3 >/dev/null 2>&1
[ -d /work/snap/after ] || git worktree add --detach /work/snap/after "$AFTER" >/dev/null 2>&1
for w in before after; do ln -sfn /work/main/runs /work/snap/$w/runs; done
unset TGD_CPU_DEVICES XLA_FLAGS
export TGD_COMPILATION_CACHE=off   # every run compiles, like a first run
demo() {  # $1 = before|after
  cd /work/snap/$1
  s=$(date +%s.%N)
  PYTHONPATH=/work/snap/$1 $PY reproduce.py --preset=demo --out=$OUT/demo_$1 > $OUT/demo_$1.log 2>&1
  echo "demo_$1 rc=$? wall_s=$(echo "$(date +%s.%N) - $s" | bc)" >> $OUT/times.txt
}
step() {  # $1 = before|after, $2 = label, extra env in $3
  cd /work/snap/$1
  s=$(date +%s.%N)
  env $3 PYTHONPATH=/work/snap/$1 $PY train.py --config=configs/train.py:demo \
    --config.data.path=$OUT/demo_before/data/train.h5 --config.num_steps=600 \
    --config.eval_every=600 --config.log_every=100 --workdir=$OUT/step_$2 > $OUT/step_$2.log 2>&1
  echo "step_$2 rc=$? wall_s=$(echo "$(date +%s.%N) - $s" | bc)" >> $OUT/times.txt
}
demo before
step before before_default ""
step after after_default ""
step after after_1device "TGD_CPU_DEVICES=1"
demo after
echo finished >> $OUT/times.txt
