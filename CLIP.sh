#!/usr/bin/env bash
# Start clip-service under gunicorn with the project's config, from any working directory.
# Settings come from .env beside this script (or CLIP_ENV_FILE) and the environment.
set -euo pipefail
# SIGHUP asks for a reload (systemctl reload), never an exit: ignored from the first line on, through
# this script's own subshells and gunicorn's start-up (an ignored signal stays ignored across exec),
# until gunicorn's master and each worker install their handlers (gunicorn.conf.py, http/front_door.py).
trap '' HUP
cd "$(dirname "$(readlink -f "$0")")"
VENV="${CLIP_VENV:-.venv}"
if [[ ! -x "$VENV/bin/gunicorn" ]]; then
    echo "CLIP.sh: no virtual environment at $VENV; install first:" >&2
    echo "  python3 -m venv .venv && .venv/bin/pip install -r requirements.txt" >&2
    exit 1
fi
exec "$VENV/bin/gunicorn" --config gunicorn.conf.py "$@" REST:app
