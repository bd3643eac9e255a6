#!/bin/bash
# Device sweep 2: longer runs and fusion lr (see docs/reranker.md); logs to $OUT.
# Sweeps ran with group_batches=true as the default; it is false now, hence the explicit flag.
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH=.:.site PYTHONUNBUFFERED=1
PY=${PY:-python3}
TR=artifacts/data/train/data.csv; TE=artifacts/data/test/data.csv
LOG=$OUT/log.jsonl; mkdir -p /tmp/logs
run() { name=$1; shift; sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout 330 $PY bench/reranker_experiment.py --name "$name" --train $TR --test $TE --out-dir /tmp/ck --log $LOG --threads 2 "${sets[@]}" --set device=cuda --set amp=none > "/tmp/logs/$name.txt" 2>&1; tail -7 /tmp/logs/$name.txt; }
run S_lr3 epochs=10 fusion_lr_mult=3 group_batches=true &
run U_dense_e40 epochs=40 group_batches=true &
run W_randbatch_e20 epochs=20 group_batches=false group_itm=false &
run Y_lr3_e20 epochs=20 fusion_lr_mult=3 group_batches=true &
wait
tar czf $OUT/logs.tgz -C /tmp logs
