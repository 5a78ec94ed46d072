#!/usr/bin/env bash
# Retrain the toy world from scratch and ship it: the target LMM, then the FLASH drafts and the EAGLE-3
# draft on the same data, then bf16 copies into assets/world/. Every stage resumes where a stopped run ended.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup.sh
.venv/bin/python benchmarks/world/train_target.py --out build/world
.venv/bin/python benchmarks/world/train_drafts.py --world build/world
.venv/bin/python benchmarks/world/train_drafts.py --world build/world --ship
