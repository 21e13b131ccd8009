"""The HTTP layer: the app factory, one module of routes per resource, and the JSON bodies."""
