"""ringserve clients: blocking :class:`Client` and asyncio :class:`AsyncClient`.

Both speak the wire protocol through the same sans-IO core (:mod:`clients.session`); one
connection carries any number of streams. See the README's "Client guide".
"""

from clients import errors
from clients.aio import AsyncClient, AsyncPending, AsyncStream
from clients.client import DEFAULT_ENDPOINT, Client, Pending, Stream
from clients.errors import (ConnectionLostError, EngineTimeout, RingserveError, StreamClosedError,
                            StreamResetError)
from clients.results import Event, Result, StreamReset, Utterance

__all__ = [
    "DEFAULT_ENDPOINT", "AsyncClient", "AsyncPending", "AsyncStream", "Client", "ConnectionLostError",
    "EngineTimeout", "Event", "Pending", "Result", "RingserveError", "Stream", "StreamClosedError",
    "StreamReset", "StreamResetError", "Utterance", "errors",
]
