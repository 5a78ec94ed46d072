#!/usr/bin/env bash
# Retrain the toy world from scratch and ship it: the target LMM, then the FLASH drafts and the EAGLE-3
# draft on the same data (in parallel, one core each), then bf16 copies into assets/world/. Every stage
# resumes where a stopped run ended.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
.venv/bin/python benchmarks/world/train_target.py --out build/world
.venv/bin/python benchmarks/world/train_drafts.py --world build/world --drafts ""   # the distilled data
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/world/train_drafts.py --world build/world --drafts flash \
    > build/world/drafts_flash.out 2>&1 &
flash=$!
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/world/train_drafts.py --world build/world --drafts eagle3 \
    > build/world/drafts_eagle3.out 2>&1 || { echo "eagle3 failed: build/world/drafts_eagle3.out"; exit 1; }
wait "$flash" || { echo "FLASH drafts failed: build/world/drafts_flash.out"; exit 1; }
.venv/bin/python benchmarks/world/train_drafts.py --world build/world --ship
