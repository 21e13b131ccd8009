"""clip-service: label images with CLIP over HTTP."""

from clip_service.app import create_app
from clip_service.settings import Settings, load_settings

__all__ = ["Settings", "create_app", "load_settings"]
