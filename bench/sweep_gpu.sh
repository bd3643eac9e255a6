#!/bin/bash
# Device sweep: run reranker experiments in parallel on one GPU; logs to $OUT.
# Needs open_clip, ftfy and wcwidth importable from .site (copied from .venv's site-packages)
# and the synthetic data under artifacts/data (see docs/reranker.md).
# Sweeps ran with group_batches=true as the default; it is false now. Every run below without
# group_batches=false gets group_batches=true via $D.
set -u
export HF_HUB_OFFLINE=1 PYTHONPATH=.:.site PYTHONUNBUFFERED=1
PY=${PY:-python3}
TR=artifacts/data/train/data.csv; TE=artifacts/data/test/data.csv
LOG=$OUT/log.jsonl; mkdir -p /tmp/logs; nvidia-smi -L; $PY -c "import open_clip, torch; print(open_clip.__version__, torch.__version__)" || exit 1
run() { name=$1; shift; sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout 400 $PY bench/reranker_experiment.py --name "$name" --train $TR --test $TE --out-dir /tmp/ck --log $LOG --threads 2 "${sets[@]}" --set device=cuda --set amp=none > "/tmp/logs/$name.txt" 2>&1; tail -7 /tmp/logs/$name.txt; }
E=10
D=group_batches=true
run A_randbatch_mined group_batches=false group_itm=false epochs=$E &
run B_twinbatch_mined group_itm=false epochs=$E $D &
run C_twin_dense epochs=$E $D &
run D_freeze_half freeze_towers_from=0.5 epochs=$E $D &
run E_noitmgrad itm_into_towers=false epochs=$E $D &
run F_fusion4 fusion_layers=4 epochs=$E $D &
run G_lr2e3 lr=0.002 epochs=$E $D &
run H_randbatch_randneg group_batches=false group_itm=false hard_negatives=false epochs=$E &
wait
run I_batch64 batch_size=64 epochs=$E $D &
run J_lr5e4 lr=0.0005 epochs=$E $D &
run K_nolist listwise_weight=0 epochs=$E $D &
run L_twin_dense_e20 epochs=20 $D &
run M_itmstart itm_start=0.3 epochs=$E $D &
run N_freeze_03 freeze_towers_from=0.3 epochs=$E $D &
run O_itm2 itm_weight=2 listwise_weight=2 epochs=$E $D &
run P_fusion1 fusion_layers=1 epochs=$E $D &
wait
tar czf $OUT/logs.tgz -C /tmp logs
