"""gunicorn settings for clip-service, derived from the validated `.env` settings.

Each worker loads its own model after the fork (CUDA does not survive a fork), so the app is never
preloaded in the master.
"""

import contextlib
import os
import shutil
import signal
import tempfile

# prometheus_client picks its storage when first imported: multiprocess files must be set up before
# anything imports it, so /metrics can add up every worker's samples.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="clip-service-metrics-")
    _OWN_METRICS_DIR = True
else:
    _OWN_METRICS_DIR = False

from clip_service.http.current import EXTENSION  # noqa: E402
from clip_service.http.front_door import door_limits  # noqa: E402
from clip_service.http.limits import body_limits  # noqa: E402
from clip_service.startup import preflight_or_exit, reload_on_sighup, worker_count  # noqa: E402

_settings = preflight_or_exit()

bind = f"{_settings.bind_host}:{_settings.port}"
# gthread behind a front door: requests are framed by h11 and read in full by the event loop, under
# REQUEST_TIMEOUT from arrival, before they take a thread, and answers are sent by the loop; past
# MAX_QUEUE they get 503 at once; /health has a thread of its own.
worker_class = "clip_service.http.front_door.FrontDoorWorker"
# Connections per worker, refused ones still draining included; the door keeps it FD_RESERVE under the
# process's descriptor limit (the systemd units raise that with LimitNOFILE).
worker_connections = 1000
# One worker holds one model. On a CPU one worker (its inference threads use every core); on a GPU,
# several per GPU, because one worker's Python work (HTTP, decoding) cannot keep a GPU busy.
workers = worker_count(_settings)
# Threads overlap network and decoding with inference inside a worker.
threads = _settings.serving_threads
door_limits(_settings.max_queue, _settings.request_timeout, body_limits(_settings), threads)
# Loading happens in a background thread, so the heartbeat only has to cover a slow request.
timeout = max(120, int(_settings.request_timeout) * 2)
graceful_timeout = max(30, int(_settings.request_timeout) + 5)
keepalive = 5
preload_app = False
# gunicorn 25+ opens a control socket at one fixed path per user; several instances would collide.
control_socket_disable = True
# The app logs one line per request itself, without query strings (URLs can carry credentials).
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower()
limit_request_line = 8190


def when_ready(server):
    """SIGHUP to the master reloads the labels (and the photo index) in every worker, instead of
    restarting them."""
    def forward_hup(arbiter=server):
        arbiter.log.info("SIGHUP: reloading labels and the photo index in %d worker(s)", len(arbiter.WORKERS))
        for pid in list(arbiter.WORKERS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    server.handle_hup = forward_hup


def post_fork(server, worker):
    """Split the cores between workers so they do not oversubscribe the CPU."""
    import torch

    torch.set_num_threads(_settings.torch_threads or max(1, (os.cpu_count() or 1) // workers))


def post_worker_init(worker):
    reload_on_sighup(worker.wsgi.extensions[EXTENSION])


def worker_exit(server, worker):
    """Stop the model's threads first: one still inside torch at exit would abort the worker."""
    if getattr(worker, "wsgi", None) is not None:
        worker.wsgi.extensions[EXTENSION].stop()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
