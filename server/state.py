"""The app's one engine and its lifecycle: loading, ready, draining; and the gate in front
of /v1 (API key, 503 while loading or draining, the count of requests in flight)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moestream.engine import Engine, QueueFull, SamplingParams
from moestream.kernels.errors import MoestreamError
from moestream.server.async_engine import AsyncEngine, ServerStopping
from moestream.server.errors import APIError
from moestream.server.generation import Generation
from moestream.server.limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_TIMEOUT_S
from moestream.server.metrics import EngineView, RequestRecord, ServerMetrics

log = logging.getLogger(__name__)

EXIT_USAGE = 2
LOADING_RETRY_AFTER_S = 5
QUEUE_FULL_RETRY_AFTER_S = 1
CUT_STREAMS_WAIT_S = 3.0  # after the grace: time for the requests cut off to send their error


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    ctx_size: int = 4096  # an upper bound of the model length, for the token-count buckets
    shutdown_grace_s: float = 30.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no cross-origin browser access
    reasoning_format: str = "auto"  # auto: reasoning_content apart when the template has a format; none


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics
    engine: AsyncEngine | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    draining_since_s: float | None = None
    num_in_flight: int = 0
    exit_code: int | None = None  # set when the server must stop (a load failure)
    cut_since_s: float | None = None  # when the drain's grace ran out with requests in flight
    load_error: MoestreamError | None = None  # what to tell the user when exit_code is EXIT_USAGE
    loader: threading.Thread | None = None

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.draining_since_s is None

    # -- lifecycle ------------------------------------------------------------------
    def load_in_background(self, load: Callable[[], Engine], loop: asyncio.AbstractEventLoop) -> None:
        def run() -> None:
            try:
                engine = load()
            except MoestreamError as exc:  # the command line prints it once the server has stopped
                self.load_error = exc
                self.exit_code = EXIT_USAGE
                return
            except Exception:
                log.exception("loading the model failed")
                self.exit_code = 1
                return
            loop.call_soon_threadsafe(self._serve, engine, loop)

        self.loader = threading.Thread(target=run, name="moestream-loader", daemon=True)
        self.loader.start()

    def _serve(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = AsyncEngine(engine, loop).start()
        cfg = engine.config
        info = {"arch": cfg.arch, "n_layers": str(cfg.n_layers), "n_experts": str(cfg.n_experts),
                "n_experts_used": str(cfg.n_experts_used), "max_model_len": str(engine.max_model_len),
                "device": str(engine.device)}
        self.metrics.bind_engine(EngineView(lambda: self.engine.stats, engine.plan, info))
        log.info("ready: serving %r on the OpenAI API", self.settings.served_model_name)

    def begin_drain(self) -> None:
        if self.draining_since_s is None:
            self.draining_since_s = time.monotonic()
            log.info("draining: refusing new requests, waiting for %d in flight (up to %.0f s)",
                     self.num_in_flight, self.settings.shutdown_grace_s)

    def should_exit(self) -> bool:
        if self.exit_code is not None:
            return True
        if self.draining_since_s is None:
            return False
        now_s = time.monotonic()
        if self.num_in_flight == 0:
            return True
        if now_s - self.draining_since_s <= self.settings.shutdown_grace_s:
            return False
        if self.cut_since_s is None:
            self.cut_since_s = now_s
            self._cut_requests()
        return now_s - self.cut_since_s > CUT_STREAMS_WAIT_S

    def _cut_requests(self) -> None:
        """End what is still running with an error (an event for a stream), rather than let
        uvicorn close connections under requests that would look complete."""
        log.warning("drain: %d requests still in flight after %.0f s; ending them with an error",
                    self.num_in_flight, self.settings.shutdown_grace_s)
        if self.engine is not None:
            self.engine.fail_all(ServerStopping(
                f"the server shut down before this request finished (it waited "
                f"{self.settings.shutdown_grace_s:g} s, its --shutdown-grace)"))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # -- requests -------------------------------------------------------------------
    def refusal(self, authorization: bytes | None) -> APIError | None:
        key = self.settings.api_key
        # Bytes, not text: a header may hold any byte, and compare_digest takes only ASCII str.
        if key is not None and not secrets.compare_digest(authorization or b"", f"Bearer {key}".encode()):
            return APIError("missing or wrong API key: send 'Authorization: Bearer <key>'",
                            "authentication_error", code="invalid_api_key")
        if self.draining_since_s is not None:
            return APIError("the server is shutting down", "unavailable_error")
        if self.engine is None:
            return APIError("the model is loading; retry shortly", "unavailable_error",
                            retry_after_s=LOADING_RETRY_AFTER_S)
        return None

    def check_model(self, model: str | None) -> str:
        name = self.settings.served_model_name
        if model is not None and model != name:
            raise APIError(f"the model {model!r} does not exist; this server serves {name!r}",
                           "not_found_error", param="model", code="model_not_found")
        return name

    async def start(self, prompt_ids: list[int], make_params: Callable[[int], SamplingParams],
                    requested_max_tokens: int | None, stops: list[str], arrival_s: float,
                    prompt_param: str) -> Generation:
        """Queue a request; `make_params(max_tokens)` builds its sampling settings."""
        gens = await self.start_choices(prompt_ids, lambda m, _: make_params(m), 1, requested_max_tokens, stops,
                                        arrival_s, prompt_param)
        return gens[0]

    async def start_choices(self, prompt_ids: list[int], make_params: Callable[[int, int], SamplingParams],
                            n: int, requested_max_tokens: int | None, stops: list[str], arrival_s: float,
                            prompt_param: str) -> list[Generation]:
        """Queue a request's n choices on one prompt, prefilled once; `make_params(max_tokens,
        choice)` builds each one's sampling settings."""
        engine = self.engine
        limit = engine.engine.max_model_len
        room = limit - len(prompt_ids)
        if room <= 0:
            raise APIError(f"the prompt has {len(prompt_ids)} tokens but the context holds {limit}: shorten "
                           "the prompt or start the server with a larger --ctx-size", param=prompt_param,
                           code="context_length_exceeded")
        if requested_max_tokens is not None and requested_max_tokens > room:
            raise APIError(f"max_tokens is {requested_max_tokens} but the context holds {limit} tokens and the "
                           f"prompt takes {len(prompt_ids)}: ask for at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        max_tokens = requested_max_tokens or room
        try:
            params = [make_params(max_tokens, i) for i in range(n)]
        except MoestreamError as exc:
            raise APIError(str(exc)) from None
        try:
            streams = await engine.add_group(prompt_ids, params)
        except QueueFull as exc:
            raise APIError(str(exc), "unavailable_error", code="queue_full",
                           retry_after_s=QUEUE_FULL_RETRY_AFTER_S) from None
        except MoestreamError as exc:
            raise APIError(str(exc), param=prompt_param) from None
        return [Generation(engine, stream, engine.engine.tokenizer, stops, self.metrics,
                           RequestRecord(arrival_s, len(prompt_ids))) for stream in streams]


class Gate:
    """ASGI middleware in front of /v1: API key, loading/draining refusals, in-flight count."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        error = self.state.refusal(dict(scope["headers"]).get(b"authorization"))
        if error is not None:
            await error.response()(scope, receive, send)
            return
        self.state.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.num_in_flight -= 1
