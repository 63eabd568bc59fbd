"""A thin proxy so llama.cpp's server tests (tools/server/tests) can run against moestream:
`python -m bench.llama_server_adapter --listen 8080 --upstream http://127.0.0.1:8000`.

Their harness talks to one llama-server; with DEBUG_EXTERNAL=1 and PORT=8080 it uses the
server already listening there. Two llama-server habits differ from moestream, and only
these are bridged, so that what fails afterwards is a real difference of features:
- OpenAI routes without the /v1 prefix (`/chat/completions`, `/models`, `/embeddings`)
  are forwarded to /v1/...; llama-server's own routes (`/completion`, `/completions`,
  `/tokenize`, `/props`, `/slots`, ...) pass through unchanged and get moestream's 404.
- llama-server serves whatever `model` a request names; moestream answers 404 for a name
  it does not serve, so `model` is dropped from JSON bodies (moestream then uses its own).
Everything else (headers, status, streamed bodies) passes through as it comes.
"""

from __future__ import annotations

import argparse
import json

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

OPENAI_UNPREFIXED = ("/chat/completions", "/models", "/embeddings", "/responses")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "host"}


def upstream_path(path: str) -> str:
    if any(path == p or path.startswith(p + "/") for p in OPENAI_UNPREFIXED):
        return "/v1" + path
    return path


def upstream_body(body: bytes) -> bytes:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body
    if isinstance(data, dict) and "model" in data:
        del data["model"]
        return json.dumps(data).encode()
    return body


def make_app(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=None)

    async def forward(request: Request) -> StreamingResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        upstream_request = client.build_request(
            request.method, upstream_path(request.url.path), params=request.query_params, headers=headers,
            content=upstream_body(await request.body()))
        response = await client.send(upstream_request, stream=True)
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 headers={k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS},
                                 background=BackgroundTask(response.aclose))

    methods = ["GET", "POST", "DELETE", "OPTIONS", "PUT"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=int, default=8080)
    p.add_argument("--upstream", default="http://127.0.0.1:8000")
    args = p.parse_args()
    uvicorn.run(make_app(args.upstream), host="127.0.0.1", port=args.listen, log_level="warning")


if __name__ == "__main__":
    main()
