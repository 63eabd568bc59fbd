"""The FastAPI app and `moestream serve`.

The server binds first and loads the model in a background thread, so /health answers
503 while loading. SIGTERM drains: new requests get 503, requests in flight finish
(within --shutdown-grace seconds), then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi import Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import generate_latest

from moestream.engine import Engine
from moestream.kernels.errors import MoestreamError
from moestream.server.errors import install_error_handlers
from moestream.server.metrics import ServerMetrics
from moestream.server.model_source import ModelSource
from moestream.server.options import engine_options
from moestream.server.responses_api import router as responses_router
from moestream.server.routes import router
from moestream.server.state import Gate, ServerSettings, ServerState

log = logging.getLogger(__name__)
_TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what Prometheus 2.x and 3.x parse
_UVICORN_CLOSE_TIMEOUT_S = 5  # after the drain: cut connections still open this long


def create_app(settings: ServerSettings, load: Callable[[], Engine]) -> FastAPI:
    """An app that loads its engine with `load` (in a thread) once it has started."""
    state = ServerState(settings, ServerMetrics(settings.served_model_name, settings.ctx_size))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_in_background(load, asyncio.get_running_loop())
        yield
        state.shutdown()

    app = FastAPI(title="moestream", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(responses_router)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        # Always the text format: asked for OpenMetrics (as Prometheus 2.x does),
        # prometheus-client writes "moestream_x" samples under a "moestream:x" TYPE line
        # (client_python#1177), and every "moestream:" query then comes back empty.
        return Response(generate_latest(state.metrics.registry), media_type=_TEXT_FORMAT)

    app.add_middleware(Gate, state=state)
    if settings.allowed_origins:
        # Added last, so outermost: a preflight is answered before the API key is asked for,
        # and the Gate's refusals carry CORS headers the browser can read.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains the app instead of closing connections at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.state.draining_since_s is None:
            # Not recorded as a captured signal: uvicorn would re-raise it after the
            # shutdown and the process would die by SIGTERM instead of exiting 0.
            self.state.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or self.state.should_exit()


def serve(args: argparse.Namespace) -> int:
    from moestream.server.demo import DEMO_MODEL_NAME, demo_max_cached_experts, demo_model_path

    if args.demo:
        log.warning("--demo: serving a small synthetic model with random weights; its text is gibberish")
        source = ModelSource(str(demo_model_path()))
        default_name = DEMO_MODEL_NAME
    elif args.model:
        source = ModelSource(args.model)
        source.check()
        default_name = source.default_name
    else:
        raise MoestreamError("give --model FILE.gguf (or hf:OWNER/REPO/FILE.gguf, or set "
                             "MOESTREAM_MODEL), or --demo for a synthetic model")
    options = dict(engine_options(args), max_batch=args.max_batch, max_waiting=args.max_waiting,
                   max_batched_tokens=args.max_batched_tokens)
    if args.demo and args.vram_budget is None and args.max_cached_experts is None:
        options["max_cached_experts"] = demo_max_cached_experts()
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach the port can use it", args.host)
    settings = ServerSettings(served_model_name=args.served_model_name or default_name,
                              api_key=args.api_key, ctx_size=args.ctx_size,
                              allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                              shutdown_grace_s=args.shutdown_grace)
    app = create_app(settings, lambda: load_engine(source, options))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=_UVICORN_CLOSE_TIMEOUT_S, access_log=False)
    server = DrainingServer(config, app.state.server)
    server.run()
    exit_code = app.state.server.exit_code
    return exit_code if exit_code is not None else 0


def load_engine(source: ModelSource, options: dict) -> Engine:
    path = source.resolve()
    log.info("loading %s (%s)", path, ", ".join(f"{k}={v}" for k, v in options.items()))
    engine = Engine.from_gguf(path, **options)
    cfg = engine.config
    log.info("model %s: %s, %d layers, %d experts (%d used per token), context %d",
             cfg.name, cfg.arch, cfg.n_layers, cfg.n_experts, cfg.n_experts_used, engine.max_model_len)
    if engine.plan is None:  # with a plan, engine.placement has logged it
        log.info("placement: every expert stays in host memory on %s (no expert cache)", engine.device)
    return engine
