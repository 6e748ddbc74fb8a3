"""`zquant serve`: OpenAI's HTTP API over zquant's decode path, with continuous batching.

`Scheduler` (one thread that owns the model) batches the requests step by step; `create_app`
builds the Starlette app around it; `protocol` is OpenAI's request and response shapes. Needs the
``serve`` extra (Starlette, uvicorn, prometheus_client).
"""
from .app import ServerConfig, create_app
from .scheduler import Scheduler

__all__ = ["Scheduler", "ServerConfig", "create_app"]
