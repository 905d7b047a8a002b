"""Admission control in front of the model server: body size limit and load shedding.

:class:`AdmissionMiddleware` is a plain ASGI middleware wrapped around KServe's FastAPI
app by ``serving.__main__``. Inference routes (``:predict``, ``:explain``, ``/infer``)
are admitted while fewer than ``max_in_flight`` of them are running; beyond that the
request is answered at once with 503 and ``Retry-After`` (load shedding), so a server
under overload keeps its latency for the requests it accepts and recovers by itself as
soon as the load drops. Health, readiness and ``/metrics`` are never shed. A body larger
than ``max_body_bytes`` gets 413 before it is parsed.

The body of an inference request is read whole before the request takes an in-flight
slot, within ``body_timeout_s`` (408 after that): a client that sends its headers and
then trickles or withholds the body holds no slot, and is dropped at the deadline.
Neither uvicorn (only ``timeout_keep_alive``, between requests) nor KServe bounds the
time a body may take, so without this 64 sockets that sent ``Content-Length: 1000`` and
6 bytes shed every inference request with 503 for as long as they stayed open.

Counters are Prometheus metrics in the default registry, which KServe serves on
``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from kserve.errors import InvalidInput
from prometheus_client import Counter, Gauge

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 256 * 1024
# Room for bursts: with Locust, whose users sent in bursts of ~30, a limit of 16 shed
# 43% of 300 req/s (100k items); with evenly spaced arrivals (wrk, make bench-serve)
# 16 shed none. 64 keeps bursty clients unshed, and 10x overload is still shed with
# 503s; accepted requests then wait longer under overload (p50 ~0.12 s at 10x): lower
# --max-in-flight to trade.
DEFAULT_MAX_IN_FLIGHT = 64
# Seconds a client has to send a whole inference body (256 KB takes milliseconds).
DEFAULT_BODY_TIMEOUT_S = 10.0
_INFERENCE_SUFFIXES = (":predict", ":explain", "/infer")

REJECTED = Counter(
    "shopml_server_rejected_requests_total",
    "Requests refused before reaching a model, by reason (shed: overload, too_large, "
    "body_timeout).",
    ["reason"],
)
IN_FLIGHT = Gauge(
    "shopml_server_in_flight_requests", "Inference requests being served right now."
)


def is_inference_path(path: str) -> bool:
    """Whether a URL path runs a model (and so may be shed under overload)."""
    return path.endswith(_INFERENCE_SUFFIXES)


class AdmissionMiddleware:
    """Sheds inference requests beyond a concurrency limit and refuses large bodies.

    Args:
        app: the ASGI app to protect.
        max_in_flight: inference requests served at once; more get 503.
        max_body_bytes: largest request body accepted; larger ones get 413.
        body_timeout_s: seconds a client has to send its whole body; later gets 408.

    Raises:
        ValueError: a limit below 1, or a body timeout not above 0.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        if max_in_flight < 1 or max_body_bytes < 1:
            raise ValueError(
                f"max_in_flight={max_in_flight} and max_body_bytes={max_body_bytes} "
                "must both be at least 1"
            )
        if body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s={body_timeout_s} must be above 0")
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit, shed or refuse one ASGI request."""
        if scope["type"] != "http" or not is_inference_path(scope["path"]):
            await self.app(scope, receive, send)
            return

        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await self._refuse(send, 413, "too_large", self._too_large_message(length))
            return
        # The body is read before a slot is taken: a slow client holds none.
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
        except TimeoutError:
            await self._refuse(
                send,
                408,
                "body_timeout",
                f"the request body did not arrive within {self.body_timeout_s:g} s",
            )
            return
        except BodyTooLarge as err:
            await self._refuse(send, 413, "too_large", str(err))
            return
        if body is None:
            return  # the client left before its body was complete
        if self.in_flight >= self.max_in_flight:
            await self._refuse(
                send,
                503,
                "shed",
                f"the server is at its limit of {self.max_in_flight} concurrent "
                "inference requests; retry after a short pause",
            )
            return

        self.in_flight += 1
        IN_FLIGHT.inc()
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1
            IN_FLIGHT.dec()

    def _too_large_message(self, length: int) -> str:
        return (
            f"the request body has {length} bytes; the limit is "
            f"{self.max_body_bytes} bytes: send fewer rows per request"
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` if the client disconnected first.

        Raises:
            BodyTooLarge: the body (sent without Content-Length, or longer than it
                said) grew past ``max_body_bytes``.
        """
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                raise BodyTooLarge(self._too_large_message(received))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, send: Send, status: int, reason: str, message: str) -> None:
        REJECTED.labels(reason=reason).inc()
        logger.debug("refused request status=%d reason=%s", status, reason)
        body = json.dumps({"error": message}).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        if status == 408:
            headers.append((b"connection", b"close"))
        await send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(InvalidInput):
    """A streamed body (no Content-Length) grew past the limit: answered with 413."""


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the real one.

    After the body, the app only listens for the client's disconnect, which the real
    ``receive`` reports.
    """
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
