"""Signed HTTP between validators and miners (bittensor 11 has no Axon/Dendrite).

``server`` is the miner side (FastAPI app + uvicorn thread), ``client`` the
validator side (httpx); both authenticate with ``bittensor.http_auth``.
"""

from distributed_training.transport.client import MinerClient, QueryResult, Target
from distributed_training.transport.server import (
    Authorize,
    MinerHandlers,
    PortInUseError,
    ServerHandle,
    build_app,
    serve_in_thread,
)

__all__ = [
    "Authorize",
    "MinerClient",
    "MinerHandlers",
    "PortInUseError",
    "QueryResult",
    "ServerHandle",
    "Target",
    "build_app",
    "serve_in_thread",
]
