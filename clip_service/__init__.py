"""clip-service: label images with CLIP over HTTP.

`create_app` is imported on first use, so `import clip_service.settings` (and tools that only read
settings) do not load Flask, torch or a model runtime.
"""

from clip_service.settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]


def __getattr__(name: str):
    if name == "create_app":
        from clip_service.http.app import create_app

        return create_app
    raise AttributeError(f"module 'clip_service' has no attribute {name!r}")
