"""Entry point: `gunicorn REST:app` (see CLIP.sh) or `python REST.py` for a quick local run."""

from clip_service import create_app, load_settings
from clip_service.startup import preflight_or_exit

if __name__ == "__main__":
    settings = preflight_or_exit()
    create_app(settings).run(host=settings.bind_host, port=settings.port, threaded=True)
else:
    app = create_app(load_settings())
