#!/usr/bin/env bash
# RPT pretraining launcher.
#
#   bash examples/pretrain_rpt.sh                         # the embedded default (SmolLM2 + CHAMP)
#   bash examples/pretrain_rpt.sh --set train.steps=2     # extra arguments go to the entry point
#   bash examples/pretrain_rpt.sh --recipe examples/r1_distill_qwen_14b/config.py:r1_distill_qwen_14b
#
# Multi-node (torchrun's conventions; run the same command on every node):
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       bash examples/pretrain_rpt.sh --recipe examples/r1_distill_qwen_14b/config.py:r1_distill_qwen_14b
#
# Without RANK in the environment this script launches torchrun itself: NNODES (default 1),
# NODE_RANK (0), MASTER_ADDR / MASTER_PORT (a single node without MASTER_PORT uses torchrun's
# --standalone rendezvous on a free port), NPROC_PER_NODE or GPUS_PER_NODE (default: every GPU
# of the node, or 1 process on a CPU-only machine). Under a launcher that already set RANK
# (e.g. `torchrun --no-python ... bash examples/pretrain_rpt.sh`, or SLURM wrappers exporting
# torchrun's variables) it starts the Python entry point directly.
#
# Without --recipe (or --config) the embedded default recipe is used
# (examples/smollm2_cpu/config.py).
# The Python interpreter is $RPT_PYTHON (default: python3 on PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${RPT_PYTHON:-python3}"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONUNBUFFERED=1

args=("$@")
has_recipe=0
for arg in "${args[@]+"${args[@]}"}"; do
  case "$arg" in
    --recipe|--recipe=*|--config|--config=*) has_recipe=1 ;;
  esac
done
if [[ $has_recipe == 0 ]]; then
  args=(--recipe "${ROOT}/examples/smollm2_cpu/config.py:smollm2_cpu" "${args[@]+"${args[@]}"}")
fi

if [[ -n "${RANK:-}" ]]; then
  cmd=("$PYTHON" -m megatron_rpt.train "${args[@]}")
else
  NNODES="${NNODES:-1}"
  NODE_RANK="${NODE_RANK:-0}"
  NPROC="${NPROC_PER_NODE:-${GPUS_PER_NODE:-}}"
  if [[ -z "$NPROC" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    [[ "$NPROC" -ge 1 ]] || NPROC=1  # no GPU: one process on the CPU
  fi
  launch=(--nnodes "$NNODES" --nproc-per-node "$NPROC")
  if [[ "$NNODES" == 1 && -z "${MASTER_PORT:-}" ]]; then
    launch+=(--standalone)
  else
    launch+=(--node-rank "$NODE_RANK" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}")
  fi
  cmd=("$PYTHON" -m torch.distributed.run "${launch[@]}" -m megatron_rpt.train "${args[@]}")
fi

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
