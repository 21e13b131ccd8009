"""gunicorn settings for clip-service, derived from the validated `.env` settings.

Each worker loads its own model after the fork (CUDA does not survive a fork), so the app is never
preloaded in the master.
"""

import os

from clip_service.startup import preflight_or_exit

_settings = preflight_or_exit()

bind = f"{_settings.bind_host}:{_settings.port}"
worker_class = "gthread"
# One worker holds one model; more workers on one GPU or a small CPU only multiply memory.
workers = _settings.workers or 1
# Threads overlap network and decoding with inference inside a worker.
threads = _settings.threads or 8
# Loading happens in a background thread, so the heartbeat only has to cover a slow request.
timeout = 120
graceful_timeout = 30
keepalive = 5
preload_app = False
# gunicorn 23+ opens a control socket at one fixed path per user; several instances would collide.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level.lower()
limit_request_line = 8190


def post_fork(server, worker):
    """Split the cores between workers so they do not oversubscribe the CPU."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
