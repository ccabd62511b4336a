#!/usr/bin/env bash
# Multi-node training under SLURM: one DeepSpeed node launcher per node, started by srun.
#   sbatch --nodes=8 launch/slurm.sh recipes/1b_lawa.yaml [--set key=value ...]
# A run resumes from its latest checkpoint by itself, so a requeued or resubmitted job simply continues.
#SBATCH --job-name=polyak
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch launch/slurm.sh RECIPE [--set key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PY=${PY:-.venv/bin/python}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${SLURM_GPUS_ON_NODE:-8}
# DeepSpeed's node launcher takes the world as base64 JSON: {host: [local GPU ids]} in node-rank order.
WORLD_INFO=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | "$PY" -c '
import base64, json, sys
gpus = list(range(int(sys.argv[1])))
print(base64.urlsafe_b64encode(json.dumps({h.strip(): gpus for h in sys.stdin if h.strip()}).encode()).decode())' "$GPUS")
srun --kill-on-bad-exit=1 bash -c "exec $PY -m deepspeed.launcher.launch --world_info=$WORLD_INFO \
  --node_rank=\$SLURM_NODEID --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT \
  launch/pretrain.py --recipe $RECIPE $*"
