#!/bin/bash
# One training rank, started by `srun` from train.sbatch (one Slurm task per rank).
# Translates Slurm's task variables into the torch.distributed ones the engine reads, then
# execs the command, so the rank is the process that Slurm tracks and signals directly.
#
#   srun bash launch/slurm/task.sh PYTHON launch/train.py [overrides...]
set -euo pipefail

: "${SLURM_PROCID:?task.sh must run under srun (SLURM_PROCID is not set)}"
: "${MASTER_ADDR:?MASTER_ADDR is not set (train.sbatch exports it)}"
: "${MASTER_PORT:?MASTER_PORT is not set (train.sbatch exports it)}"

export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export NODE_RANK=$SLURM_NODEID

# SLURM_STEP_TASKS_PER_NODE looks like "8(x3),4": expand it and take this node's entry, so
# LOCAL_WORLD_SIZE is right even when nodes run different task counts.
counts=()
IFS=',' read -ra groups <<<"${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
for g in "${groups[@]}"; do
    if [[ $g =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
        for ((i = 0; i < BASH_REMATCH[2]; i++)); do counts+=("${BASH_REMATCH[1]}"); done
    else
        counts+=("$g")
    fi
done
export LOCAL_WORLD_SIZE=${counts[$SLURM_NODEID]:-${counts[0]}}

# Tests (and operators who want py-spy dumps) can ask where each rank runs.
if [[ -n ${JANUS_PID_DIR:-} ]]; then
    mkdir -p "$JANUS_PID_DIR"
    echo $$ >"$JANUS_PID_DIR/rank-$RANK.pid"
fi

exec "$@"
