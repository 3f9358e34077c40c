#!/bin/bash
# Submit a training run as a chain of Slurm jobs for clusters that do not allow requeue.
#
#   launch/slurm/chain.sh -n 8 [sbatch options...] -- +recipe=janus_pro_7b run_dir=/shared/runs/7b [overrides...]
#
# Job k+1 depends on job k with --dependency=afterany, so it starts whatever way job k ended
# (checkpointed at the USR1 warning before its time limit, timed out, or crashed) and resumes
# from the newest complete checkpoint in the shared run_dir (resume=auto). Links that start
# after the run has completed exit at once. A configuration error (exit 2) cancels the rest of
# the chain. Job ids are written to ${run_dir}/chain.jobs; `scancel $(cat .../chain.jobs)` stops it.
set -euo pipefail

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() {
    echo "chain.sh: error: $*" >&2
    exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export JANUS_ROOT=${JANUS_ROOT:-$(cd "$here/../.." && pwd)}

links=""
sbatch_opts=()
while (($#)); do
    case $1 in
    -n | --links)
        (($# >= 2)) || die "$1 needs a value"
        links=$2
        shift 2
        ;;
    --) shift && break ;;
    -h | --help) usage ;;
    *) sbatch_opts+=("$1") && shift ;;
    esac
done
[[ -n $links ]] || die "give the number of jobs with -n LINKS"
[[ $links =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$links'"
(($#)) || die "no training overrides after '--' (at least +recipe=NAME)"

# Every link must use the same run dir, so fix it here (absolute, like train.sbatch does).
overrides=()
run_dir=""
for a in "$@"; do
    if [[ $a =~ ^\+{0,2}run_dir=(.*)$ ]]; then
        run_dir=${BASH_REMATCH[1]}
        [[ -n $run_dir ]] || die "empty run_dir= override"
        [[ $run_dir == /* ]] || run_dir=$PWD/$run_dir
        a=${a%%run_dir=*}run_dir=$run_dir
    fi
    overrides+=("$a")
done
if [[ -z $run_dir ]]; then
    run_dir=$JANUS_ROOT/runs/janus-chain-$(date +%Y%m%d-%H%M%S)
    overrides+=("run_dir=$run_dir")
fi
mkdir -p "$run_dir"
chain_file=$run_dir/chain.jobs
: >"$chain_file"

prev=""
for ((i = 1; i <= links; i++)); do
    dep=()
    [[ -z $prev ]] || dep=(--dependency="afterany:$prev")
    # --no-requeue: in a chain the next link continues the run, not a requeue of this one.
    prev=$(JANUS_SELF_REQUEUE=0 JANUS_CHAIN_LINK=$i JANUS_CHAIN_FILE=$chain_file \
        sbatch --parsable --no-requeue "${dep[@]}" "${sbatch_opts[@]}" \
        "$here/train.sbatch" "${overrides[@]}")
    prev=${prev%%;*}
    echo "$prev" >>"$chain_file"
    echo "link $i/$links: job $prev${dep:+ (${dep[0]})}"
done
echo "run dir: $run_dir (job ids in $chain_file)"
