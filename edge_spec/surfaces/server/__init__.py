"""`edgespec serve`: the OpenAI and Ollama APIs over one Session (app.py says how it is guarded)."""

from edge_spec.surfaces.server.app import create_app, serve, uvicorn_server
from edge_spec.surfaces.server_config import LOCAL_NAMES, ServerConfig, is_loopback

__all__ = ["LOCAL_NAMES", "ServerConfig", "create_app", "is_loopback", "serve", "uvicorn_server"]
