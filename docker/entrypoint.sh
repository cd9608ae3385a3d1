#!/bin/sh
# The image's entrypoint. No arguments: the web UI on all interfaces (port AITK_UI_PORT, 8675).
# `aitk ui` itself refuses all interfaces without AI_TOOLKIT_AUTH (aitk/ui/server.py), so this script
# adds no check of its own. Arguments are an aitk command: `docker run IMAGE run /workspace/job.yaml`.
set -eu

# On RunPod the UI is reached through https://<pod id>-<port>.proxy.runpod.net, whose proxy may not
# pass the browser's Host on: accept that origin for changes unless AITK_UI_ALLOWED_ORIGINS is set.
if [ -n "${RUNPOD_POD_ID:-}" ] && [ -z "${AITK_UI_ALLOWED_ORIGINS:-}" ]; then
    AITK_UI_ALLOWED_ORIGINS="https://${RUNPOD_POD_ID}-${AITK_UI_PORT:-8675}.proxy.runpod.net"
    export AITK_UI_ALLOWED_ORIGINS
fi

if [ "$#" -eq 0 ]; then
    set -- ui --host 0.0.0.0 --port "${AITK_UI_PORT:-8675}"
fi
exec aitk "$@"
