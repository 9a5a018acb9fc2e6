#!/bin/sh
# The container's entrypoint: `digitflow serve` (the default command) needs a model to be given,
# since training one inside a container is never what a deployment wants. Other commands
# (`pull`, `predict`, ...) pass straight through to the CLI.
set -eu
if [ "${1:-serve}" = "serve" ] && [ -z "${PRED_MODEL_PATH:-}" ] && [ -z "${PRED_MODEL_URI:-}" ]; then
    echo "digitflow: no model configured: set PRED_MODEL_PATH (a mounted checkpoint) or PRED_MODEL_URI (runs:/<uuid>/model or models:/<name>@<alias>)" >&2
    exit 64
fi
exec digitflow "$@"
