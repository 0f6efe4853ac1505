#!/usr/bin/env bash
# Start, stop or check the registry's servers on 127.0.0.1 (development; see infra/README.md):
#   SeaweedFS with the S3 API, authentication on (generated key, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
#   MLflow tracking server, SQLite backend, default artifact root s3://<bucket>/mlflow-artifacts
#
#   infra/registry-servers.sh up [--s3-port 8333] [--mlflow-port 5000] [--bucket meswitch] [--dir DIR]
#   . "${MESWITCH_HOME:-$HOME/.meswitch}/servers/env.sh"   # MLFLOW_TRACKING_URI, AWS_*, MESWITCH_ARTIFACT_URI
#   infra/registry-servers.sh status
#   infra/registry-servers.sh down
#
# `up` waits until each server answers (S3: a bucket write and read; MLflow: /health) and writes
# PIDs, logs, data and env.sh under DIR (default $MESWITCH_HOME/servers). `down` stops each by its
# PID: SIGTERM, a short wait, then SIGKILL (SeaweedFS does not stop promptly on SIGTERM).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
cd "$root"
exec "$python" "$root/tests/servers.py" "$@"
