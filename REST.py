"""Entry point: `gunicorn REST:app` (see CLIP.sh) or `python REST.py` for a quick local run."""

import signal

if __name__ == "__main__":
    # SIGHUP asks for a reload, never an exit: ignored while the model's libraries load, until
    # reload_on_sighup installs the reload CLIP.sh's workers have.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import logging  # noqa: E402

from clip_service import create_app, load_settings  # noqa: E402
from clip_service.startup import preflight_or_exit, reload_on_sighup  # noqa: E402

if __name__ == "__main__":
    settings = preflight_or_exit()
    app = create_app(settings)
    reload_on_sighup(app.extensions["clip_service"])
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its lines carry query strings (URLs)
    app.run(host=settings.bind_host, port=settings.port, threaded=True)
else:
    app = create_app(load_settings())
