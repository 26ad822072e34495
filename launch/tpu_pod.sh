#!/usr/bin/env bash
# launch/tpu_pod.sh TPU ZONE ARGS...: one cellrep run on every worker of a TPU-VM pod slice.
#
#   launch/tpu_pod.sh my-v5e-32 us-central2-b --config=configs/cellsighter.py \
#       --workdir=/mnt/shared/runs/cs --config.data.store=/mnt/shared/stores/tonsil
#
# Runs `CELLREP_DISTRIBUTED=1 python3 -m cellrep.launch ARGS...` on all workers at once
# (gcloud's --worker=all); JAX finds the pod's other workers itself. Assumes cellrep is
# installed on every worker (same version) and that the store and the work directory are
# on a filesystem all workers mount (NFS, Filestore, or a bucket through gcsfuse). Resume:
# run the same command again. CELLREP_REMOTE_DIR: the checkout on the workers (default
# ~/cellrep); PYTHON: their interpreter.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh TPU ZONE ARGS..." >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
args=$(printf ' %q' "$@")
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ${CELLREP_REMOTE_DIR:-~/cellrep} && CELLREP_DISTRIBUTED=1 ${PYTHON:-python3} -m cellrep.launch$args"
