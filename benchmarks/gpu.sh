#!/usr/bin/env bash
# Every GPU measurement issue 13 asks for, in one run (about 10 minutes on one GPU with
# 16 CPU cores; nothing here has run yet: no session was lent a GPU so far).
#   bash benchmarks/gpu.sh [OUT]      # OUT: where logs and the run folder go (default gpu_out)
# 1. energy + forces throughput, TorchForceField CUDA float32/float64 beside the OpenMM
#    CPU loops, batch 1,024 and 4,096 (goal: >= 30x the Reference loop);
# 2. training steps/s of the default generator on the GPU, records read every step vs
#    every 50 steps, batch 256 and 1,024 (compare with the 2-core CPU in BENCHMARKS.md);
# 3. the default alanine-dipeptide run with device=cuda (TorchForceField on the GPU; its
#    MD is generated on the CPU cores): wall time and ESS in OUT/aldp_cuda/metrics.json.
set -euo pipefail
OUT=${1:-gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python benchmarks/energy.py --batch-sizes 1024 4096 --torch-threads 1 2>&1 | tee "$OUT/energy.txt"
for bs in 256 1024; do
  python benchmarks/train_speed.py --device cuda --batch-size "$bs" --steps 300 --warmup 30 \
    2>&1 | tee "$OUT/train_speed_$bs.txt"
done
python scripts/train.py device=cuda progress=false hydra.run.dir="$OUT/aldp_cuda" \
  > "$OUT/aldp_cuda.log" 2>&1
python - "$OUT/aldp_cuda/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print({k: m.get(k) for k in ("ess", "ess_blocks", "wall_time_s", "steps_per_s", "dF_reweighted", "dF_reference")})
PY
