"""Entry point: `gunicorn REST:app` (see CLIP.sh) or `python REST.py` for a quick local run."""

import logging
import signal
import threading

from clip_service import create_app, load_settings
from clip_service.startup import preflight_or_exit

if __name__ == "__main__":
    settings = preflight_or_exit()
    app = create_app(settings)
    service = app.extensions["clip_service"]
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=service.reload_labels).start())
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # its lines carry query strings (URLs)
    app.run(host=settings.bind_host, port=settings.port, threaded=True)
else:
    app = create_app(load_settings())
