# shellcheck shell=bash
# Sourced by the sbatch scripts in this folder. `matpo_env` sets up the repository, venv, secrets and
# NCCL knobs; `matpo_job CMD...` runs CMD as the driver of a Ray cluster spanning the allocation
# (launch/ray_cluster.sh) and requeues the job when the driver was preempted after a checkpoint.
#
# Optional environment (export before sbatch; sbatch passes the submitting shell's environment):
#   MATPO_HOME          the repository checkout (default: the directory sbatch was run from)
#   MATPO_VENV          its virtualenv (default: $MATPO_HOME/.venv, made by tools/setup_venv.sh)
#   MATPO_DATA          MATPO-data root holding matpo_train_musique/, matpo_val_*/ (default: $MATPO_HOME/data/MATPO-data)
#   MATPO_MODEL         initial policy, an HF directory (default: $MATPO_HOME/models/Qwen3-14B-Base)
#   MATPO_RUN_DIR       where checkpoints, logs and transcripts go (default: runs/<job name>)
#   MATPO_SECRETS_FILE  KEY=value lines, e.g. SERPER_API_KEY, OPENAI_API_KEY (default ~/.config/matpo/secrets.env);
#                       sourced with tracing off and never printed
#   NCCL_*, GLOO_SOCKET_IFNAME, MATPO_RAY_TIMEOUT_S   passed through; defaults below suit A800 nodes on InfiniBand
#
# Exit status of a job: 0 done; 2 bad config (nothing started); 3 environment (repository, venv, a
# required secret); 4 the Ray cluster did not come up; 1 or the driver's own status when training
# failed. A driver that stops with 75 (SIGUSR1 from `--signal`, checkpoint written) requeues the job,
# which then resumes from that checkpoint (the scripts always pass --resume).

matpo_die() { echo "[matpo $(date +%H:%M:%S)] error: $2" >&2; exit "$1"; }
matpo_log() { echo "[matpo $(date +%H:%M:%S)] $*"; }

# matpo_env [REQUIRED_SECRET...]
matpo_env() {
  export MATPO_HOME=${MATPO_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
  [ -x "$MATPO_HOME/launch/ray_cluster.sh" ] ||
    matpo_die 3 "MATPO_HOME=$MATPO_HOME is not a megatron-matpo checkout (submit from the repository root or export MATPO_HOME)"
  cd "$MATPO_HOME" || matpo_die 3 "cannot cd to $MATPO_HOME"
  local venv=${MATPO_VENV:-$MATPO_HOME/.venv}
  [ -x "$venv/bin/matpo" ] || matpo_die 3 "no venv at $venv: run 'bash tools/setup_venv.sh' once on a login node"
  export PATH=$venv/bin:$PATH
  export MATPO_DATA=${MATPO_DATA:-$MATPO_HOME/data/MATPO-data}
  export MATPO_MODEL=${MATPO_MODEL:-$MATPO_HOME/models/Qwen3-14B-Base}
  export MATPO_RUN_DIR=${MATPO_RUN_DIR:-runs/${SLURM_JOB_NAME:-matpo}}
  export MATPO_LOG_DIR=${MATPO_LOG_DIR:-$MATPO_RUN_DIR/logs}
  mkdir -p "$MATPO_LOG_DIR"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

  local secrets=${MATPO_SECRETS_FILE:-$HOME/.config/matpo/secrets.env} mode key
  if [ -f "$secrets" ]; then
    mode=$(stat -c %a "$secrets")
    case $mode in
      ?00) ;;
      *) echo "[matpo] warning: $secrets has mode $mode; make it private: chmod 600 $secrets" >&2 ;;
    esac
    local xtrace=$-
    set +x # the values must not reach the job log
    set -a
    # shellcheck disable=SC1090
    . "$secrets"
    set +a
    case $xtrace in *x*) set -x ;; esac
  fi
  for key in "$@"; do
    [ -n "${!key:-}" ] || matpo_die 3 "$key is not set: put '$key=...' in $secrets (mode 600) or export it"
  done
  for key in SERPER_API_KEY OPENAI_API_KEY MATPO_JUDGE_API_KEY; do
    if [ -n "${!key:-}" ]; then matpo_log "$key: set"; fi
  done

  if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
    export NCCL_IB_GID_INDEX=${NCCL_IB_GID_INDEX:-3}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} # A800 has no NVLink SHARP
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # NCCL_IB_HCA / NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME are site-specific: export them if needed
  fi
  matpo_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
    "${SLURM_JOB_NUM_NODES:-1} nodes x ${SLURM_GPUS_ON_NODE:-0} GPUs; run dir $MATPO_RUN_DIR"
}

# matpo_job CMD... : the driver under launch/ray_cluster.sh; requeue on 75 (preempted)
matpo_job() {
  local rc pid
  launch/ray_cluster.sh --gpus-per-node "${SLURM_GPUS_ON_NODE:-0}" \
    --cpus-per-node "${MATPO_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}" -- "$@" &
  pid=$!
  # `--signal=B:USR1@T` signals this shell only: pass it on (the default action would end the job)
  trap 'kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'kill -TERM "$pid" 2>/dev/null' TERM
  while :; do
    wait "$pid"
    rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi # a trapped signal, not the end
    break
  done
  trap - USR1 TERM
  case $rc in
    0) matpo_log "done" ;;
    75)
      if [ -n "${SLURM_JOB_ID:-}" ]; then
        matpo_log "preempted after a checkpoint: requeueing job $SLURM_JOB_ID (it resumes from $MATPO_RUN_DIR)"
        scontrol requeue "$SLURM_JOB_ID" || matpo_die 1 "scontrol requeue failed; resubmit to resume"
      fi
      ;;
    2) matpo_log "bad config (see the error above); nothing was trained" ;;
    4) matpo_log "the Ray cluster did not come up; logs in $MATPO_LOG_DIR" ;;
    *) matpo_log "training failed with status $rc; logs in $MATPO_LOG_DIR" ;;
  esac
  return "$rc"
}
