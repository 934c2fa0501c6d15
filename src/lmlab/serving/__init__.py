"""The HTTP layer: an OpenAI-compatible server over the decoding engine (docs/serving.md).

schemas.py (request bodies, OpenAI's error shape), params.py (parameters → GenerationConfig),
scheduler.py (the engine's thread: continuous batching), responses.py (choices and response
bodies), metrics.py (Prometheus text), app.py (routes, SSE, the API key), static/chat.html.
"""

from lmlab.serving.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
