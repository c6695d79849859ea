#!/bin/bash
# Multi-node pretraining under SLURM: one torchrun agent per node, c10d rendezvous on the first node.
#
#   sbatch examples/launch/slurm_pretrain.sh [--section.key value ...]   # extra flags go to the engine
#
# Edit the placeholders (<...>) below, or override them on the sbatch command line (sbatch --nodes 8 ...).
#SBATCH --job-name=pretrain
#SBATCH --nodes=<NODES>                 # e.g. 4
#SBATCH --ntasks-per-node=1             # one torchrun agent per node; it starts the node's GPU workers
#SBATCH --gpus-per-node=<GPUS_PER_NODE> # e.g. 8
#SBATCH --cpus-per-task=<CPUS>          # e.g. 96: all of the node's cores go to its one agent
#SBATCH --time=<HH:MM:SS>               # e.g. 48:00:00
#SBATCH --signal=TERM@120               # SIGTERM 120 s before the time limit: the engine saves that step and exits
#SBATCH --no-kill                       # a failed node does not end the job: the other agents shrink to fewer nodes
#SBATCH --requeue                       # a pre-empted job is queued again; it resumes from its last checkpoint
#SBATCH --output=%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
CONFIG=${CONFIG:-examples/configs/llama_1b.toml}
# The run directory must be on storage every node sees (checkpoints, metrics.jsonl, the run lock). It does not
# depend on the job id, so a requeued or resubmitted job finds its checkpoints: `--resume auto` (the default)
# resumes from the latest complete one, resharding it if the layout (node count) changed.
RUN_DIR=${RUN_DIR:-/shared/runs/${SLURM_JOB_NAME}}
# Elastic range: fewer than SLURM_NNODES nodes (down to MIN_NODES) may continue after a node is lost. The global
# batch must divide by micro_batch x dp at every node count in the range.
MIN_NODES=${MIN_NODES:-$SLURM_NNODES}

# The first node of the allocation hosts the c10d rendezvous store (torchrun hosts it on the node whose hostname
# matches the endpoint). Losing that node ends the job; losing any other node shrinks it.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# srun starts one agent per node. Each agent:
#   --nnodes MIN:MAX       waits for up to MAX nodes; after a lost node the survivors re-form with >= MIN
#   --rdzv-backend c10d    rendezvous through a TCP store on HEAD_NODE (no etcd needed)
#   --rdzv-id JOB_ID       keeps jobs that share a head node apart
#   --rdzv-conf            last_call_timeout: how long a re-forming round waits for stragglers once MIN nodes
#                          have joined
#   --max-restarts 3       a failed worker (or lost peer) restarts the workers at most 3 times; each restart
#                          resumes from the latest checkpoint
# The engine:
#   --resume auto          resume from the latest complete checkpoint in RUN_DIR (a fresh start if none)
#   pg_timeout 300         a collective stuck on a dead peer fails after 300 s (gloo/nccl errors usually come sooner)
# SIGTERM (the --signal above, or scancel) reaches torchrun and its workers: every rank saves the current step and
# exits 0. torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM, so that save must fit in 30 s; if it
# does not, the previous complete checkpoint is used.
srun --kill-on-bad-exit=0 --cpu-bind=none \
    torchrun \
    --nnodes "${MIN_NODES}:${SLURM_NNODES}" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${HEAD_NODE}:29500" \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-conf "last_call_timeout=30" \
    --max-restarts 3 \
    examples/pretrain_gpt.py \
    --config "$CONFIG" \
    --run.dir "$RUN_DIR" \
    --resume auto \
    --resilience.pg_timeout 300 \
    "$@"
