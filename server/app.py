"""The FastAPI app and `moestream serve`.

The server binds first and loads the model in a background thread, so /health answers
503 while loading. SIGTERM drains: new requests get 503, requests in flight finish
(within --shutdown-grace seconds), then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi import Response
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import generate_latest

from moestream.engine import Engine
from moestream.engine.loader import open_gguf
from moestream.engine.startup_check import check_startup
from moestream.kernels.errors import MoestreamError
from moestream.server.errors import CatchAll, install_error_handlers
from moestream.server.limits import BodyGuard, timed_h11_protocol
from moestream.server.metrics import ServerMetrics
from moestream.server.model_source import ModelSource
from moestream.server.openapi import install_openapi
from moestream.server.options import apply_threads, engine_options
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
    install_openapi(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        # Always the text format: asked for OpenMetrics (as Prometheus 2.x does),
        # prometheus-client writes "moestream_x" samples under a "moestream:x" TYPE line
        # (client_python#1177), and every "moestream:" query then comes back empty.
        return Response(generate_latest(state.metrics.registry), media_type=_TEXT_FORMAT)

    # Starlette runs the last added first: CatchAll, then the key check, then the body read.
    app.add_middleware(BodyGuard, max_request_bytes=settings.max_request_bytes,
                       request_timeout_s=settings.request_timeout_s)
    app.add_middleware(Gate, state=state)
    if settings.allowed_origins:
        # Outside the Gate: a preflight is answered before the API key is asked for, and
        # the Gate's refusals carry CORS headers the browser can read.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"])
    app.add_middleware(CatchAll)  # added last: the outermost, so it sees the others' faults
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

    _check_serve_args(args)
    if args.demo:
        log.warning("--demo: serving a small synthetic model with random weights; its text is gibberish")
        source = ModelSource(str(demo_model_path()))
        default_name = DEMO_MODEL_NAME
    elif args.model:
        source = ModelSource(args.model)
        source.check()
        if not source.is_hub:  # a corrupt file fails here, before the port is bound
            open_gguf(source.resolve())
        default_name = source.default_name
    else:
        raise MoestreamError("give --model FILE.gguf (or hf:OWNER/REPO/FILE.gguf, or set "
                             "MOESTREAM_MODEL), or --demo for a synthetic model")
    options = dict(engine_options(args), max_batch=args.max_batch, max_waiting=args.max_waiting,
                   max_batched_tokens=args.max_batched_tokens)
    if args.demo and args.vram_budget is None and args.max_cached_experts is None:
        options["max_cached_experts"] = demo_max_cached_experts()
    _check_address_free(args.host, args.port)
    apply_threads(args.threads)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach the port can use it", args.host)
    settings = ServerSettings(served_model_name=args.served_model_name or default_name,
                              api_key=args.api_key, ctx_size=args.ctx_size,
                              allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                              shutdown_grace_s=args.shutdown_grace, max_request_bytes=args.max_request_bytes,
                              request_timeout_s=args.request_timeout, reasoning_format=args.reasoning_format)
    app = create_app(settings, lambda: load_engine(source, options))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=_UVICORN_CLOSE_TIMEOUT_S, access_log=False,
                            http=timed_h11_protocol(args.request_timeout))
    state = app.state.server
    try:
        DrainingServer(config, state).run()
    except (KeyboardInterrupt, SystemExit) as exc:  # a second Ctrl-C; uvicorn's own start-up failures
        _join_loader(state, exit_code=130 if isinstance(exc, KeyboardInterrupt) else
                     exc.code if isinstance(exc.code, int) else 1)
        raise
    _join_loader(state, exit_code=state.exit_code or 0)
    if state.load_error is not None:
        raise state.load_error  # the command line prints it on one line and exits 2
    return state.exit_code if state.exit_code is not None else 0


def _check_address_free(host: str, port: int) -> None:
    """Fail before anything loads when the address is taken: uvicorn finds out only after the
    model has begun loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise MoestreamError(f"cannot listen on {host}:{port} ({exc.strerror}): stop what uses it or "
                                 "pick another --port") from None


def _join_loader(state: ServerState, exit_code: int) -> None:
    """Wait for the loader thread before the interpreter exits: a daemon thread still inside
    torch's C++ code when Python finalizes aborts the process ("terminate called without an
    active exception", exit 134) instead of exiting with our code. A failed load's thread is
    only unwinding; a load still running (a signal while loading) cannot be cut short, so
    then the process ends at once."""
    if state.loader is None:
        return
    if state.exit_code is not None:
        state.loader.join()
    if state.loader.is_alive():
        log.warning("stopped while the model was loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def _check_serve_args(args: argparse.Namespace) -> None:
    if args.api_key is not None and not args.api_key.strip():
        # An empty key would lock every client out (no header can match "Bearer ").
        raise MoestreamError("the API key is empty: give --api-key (or MOESTREAM_API_KEY) a value, "
                             "or leave it unset to serve without one")
    if args.max_request_bytes < 1024:
        raise MoestreamError(f"--max-request-bytes is {args.max_request_bytes}: give at least 1024")
    if not args.request_timeout > 0:
        raise MoestreamError(f"--request-timeout is {args.request_timeout}: give a positive number of seconds")


def load_engine(source: ModelSource, options: dict) -> Engine:
    path = source.resolve()
    log.info("loading %s (%s)", path, ", ".join(f"{k}={v}" for k, v in options.items()))
    start_s = time.perf_counter()
    engine = Engine.from_gguf(path, **options)
    log.info("loaded in %.1f s", time.perf_counter() - start_s)
    check_startup(engine)
    cfg = engine.config
    log.info("model %s: %s, %d layers, %d experts (%d used per token), context %d",
             cfg.name, cfg.arch, cfg.n_layers, cfg.n_experts, cfg.n_experts_used, engine.max_model_len)
    if engine.plan is None:  # with a plan, engine.placement has logged it
        log.info("placement: every expert stays in host memory on %s (no expert cache)", engine.device)
    return engine
