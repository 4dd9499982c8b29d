# Sourced by the batch scripts of this folder, after they have set CHECKOUT: what every job
# derives from Slurm's variables, and the requeue at the time-limit signal.
#
# GPUS          GPUs of this node: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, else 1
# MASTER        the first node of the job, where the ranks meet
# JOB_PORT      a port of this job's own (15000 + job id mod 15000): two jobs whose first node is
#               the same host (shared nodes) would otherwise meet at one rendezvous, and the
#               second die when the first ends
# TASKS         set by the script to the pid of its srun, started in the background
#
# On USR1 (Slurm's --signal=B:USR1@LEAD before the time limit) the script sends USR1 to the job's
# steps (scancel --signal: their processes, never this script nor srun, which answers SIGTERM by
# killing its tasks), waits for its srun while every rank finishes its iteration and saves, then
# requeues the job, whose next start resumes from that checkpoint.
GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
GPUS=${GPUS##*:}  # "a100:8" -> 8
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
JOB_PORT=$((15000 + SLURM_JOB_ID % 15000))

requeue_at_time_limit() {
    echo "$(date -u +%FT%TZ) time limit near: stopping training (every rank saves a checkpoint) and requeueing job $SLURM_JOB_ID"
    scancel --signal=USR1 "$SLURM_JOB_ID"
    wait ${TASKS:-} || true  # no srun yet: wait for any child
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap requeue_at_time_limit USR1
