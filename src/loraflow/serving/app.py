"""The model server: MLflow's scoring routes and the OpenAI API on one port, over the served versions.

    python -m loraflow.serving.app --model-uri models:/quickstart@champion --port 5001   # `loraflow serve` runs this
    curl -s localhost:5001/v1/models
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "Title: Oak desk"}]}'

Routes: POST /invocations (MLflow's contract: its input formats, `{"predictions": [...]}`, its error
JSON; answered by the default version, NAME@champion as the alias is now), GET /ping, /health and
/version, and the OpenAI routes of openai_api. With $LORAFLOW_API_KEY set every route but /ping and
/health needs `Authorization: Bearer KEY` (compared in constant time); 401 otherwise. The routes are
not behind any middleware that buffers or times out a response (MLflow's scoring app wraps its own
in one), so streams flow; each request's budget ($LORAFLOW_REQUEST_SECONDS, up to --timeout less 5 s)
bounds its wait and its generation instead.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request  # at module level: FastAPI reads the routes' annotations from the module

from loraflow.serving.batching import MAX_BATCH_ROWS
from loraflow.serving.requests import API_KEY_ENV

SOURCE_ENV = "LORAFLOW_SERVE_MODEL_URI"  # what the server's workers serve (set by main)
ALL_VERSIONS_ENV = "LORAFLOW_SERVE_ALL_VERSIONS"
OPEN_PATHS = ("/ping", "/health")  # answered without a key: load balancers and readiness probes
logger = logging.getLogger("loraflow.serving")


class BearerKey:
    """ASGI middleware: 401 in OpenAI's error shape unless the request carries `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.authorized(scope):
            body = json.dumps({"error": {"message": "Incorrect API key provided: send 'Authorization: Bearer KEY' "
                                         f"with the server's key (${API_KEY_ENV})", "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class VersionPredictor:
    """A version as a pyfunc implementation (what PyFuncModel wraps): /invocations' predict, through the engine."""

    def __init__(self, version):
        self.version = version

    def predict(self, data, params=None):
        from loraflow.serving.requests import checked_params, prompts_from
        from loraflow.serving.text_model import answer_prompts

        version = self.version
        prompts = prompts_from(data)
        settings = checked_params(params, version.cfg.registry.max_new_tokens_cap)
        if not prompts:
            return []
        return answer_prompts(version.engine, version.cfg, version.context_tokens, prompts, settings,
                              adapter=version.adapter, group=version.id)


def pyfunc_of(version):
    """`version` as MLflow's PyFuncModel, so /invocations checks input and params by its signature exactly as
    `mlflow models serve` does (defaults filled in, types enforced)."""
    from mlflow.pyfunc import PyFuncModel

    cached = getattr(version, "pyfunc", None)
    if cached is None:
        cached = version.pyfunc = PyFuncModel(model_meta=version.metadata, model_impl=VersionPredictor(version))
    return cached


def create_app(versions, api_key: str | None = None):
    """The FastAPI app over `versions` (a ServedVersions); with `api_key`, behind BearerKey."""
    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # every waiting request (and stream) holds a thread of the default pool: enough for a full batch
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=2 * MAX_BATCH_ROWS, thread_name_prefix="loraflow-request"))
        versions.follow()
        yield
        versions.stop()

    app = FastAPI(title="loraflow", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.versions = versions
    app.get("/ping")(ping)
    app.get("/health")(ping)
    app.get("/version")(mlflow_version)
    app.post("/invocations")(invocations)
    app.get("/v1/models")(model_list)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)
    return BearerKey(app, api_key) if api_key else app


async def ping():
    from fastapi.responses import Response

    return Response(content="\n", status_code=200, media_type="application/json")


async def mlflow_version():
    from fastapi.responses import Response
    from mlflow.version import VERSION

    return Response(content=VERSION, status_code=200, media_type="application/json")


async def invocations(request: Request):
    """MLflow's /invocations, answered by the default version (the alias's version now)."""
    from fastapi.responses import Response
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
    from mlflow.pyfunc import scoring_server

    data, content_type = await request.body(), request.headers.get("content-type") or ""
    versions = request.app.state.versions
    if versions.default() is None:  # the alias was removed while the server runs
        error = MlflowException(f"{versions.source} names no version now: set the alias again (loraflow register) "
                                "or ask for NAME/VERSION on /v1", error_code=RESOURCE_DOES_NOT_EXIST)
        return Response(error.serialize_as_json(), status_code=error.get_http_status_code(),
                        media_type="application/json")
    model = pyfunc_of(versions.default())
    try:
        result = await asyncio.to_thread(scoring_server.invocations, data, content_type, model,
                                         model.metadata.get_input_schema())
    except MlflowException as exc:
        return Response(exc.serialize_as_json(), status_code=exc.get_http_status_code(), media_type="application/json")
    return Response(content=result.response, status_code=result.status, media_type=result.mimetype)


async def model_list(request: Request):
    from loraflow.serving import openai_api

    return openai_api.model_list(request.app.state.versions)


async def chat_completions(request: Request):
    return await openai_answer(request, chat=True)


async def completions(request: Request):
    return await openai_answer(request, chat=False)


async def openai_answer(request: Request, chat: bool):
    """A chat or text completion, whole or streamed; an OpenAI-shaped error for what cannot be answered."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from loraflow.serving import openai_api

    try:
        body = await request.json()
    except ValueError:
        body = None
    try:
        if not isinstance(body, dict):
            raise openai_api.bad("the request body must be a JSON object")
        model_id, served = await asyncio.to_thread(openai_api.resolve, request.app.state.versions, body)
        if body.get("stream"):
            events = await openai_api.prepared_stream(body, model_id, served, chat)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await openai_api.complete(body, model_id, served, chat)
    except openai_api.ApiError as exc:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def app_from_env():
    """uvicorn's factory (each worker process calls it): the versions of $LORAFLOW_SERVE_MODEL_URI, loaded."""
    from loraflow.serving.versions import ServedVersions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    versions = ServedVersions.open(os.environ[SOURCE_ENV], all_versions=os.environ.get(ALL_VERSIONS_ENV) == "1")
    return create_app(versions, os.environ.get(API_KEY_ENV) or None)


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m loraflow.serving.app", description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., "
                                                           "or a pyfunc folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    parser.add_argument("--timeout", type=int, default=None, help="seconds a request may take (default 60)")
    parser.add_argument("--all-versions", action="store_true", help="hold every version, not only aliased ones")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    args = parse_args(argv)
    os.environ[SOURCE_ENV] = args.model_uri
    os.environ[ALL_VERSIONS_ENV] = "1" if args.all_versions else "0"
    if args.timeout is not None:
        os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(args.timeout)
    try:
        uvicorn.run("loraflow.serving.app:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, timeout_graceful_shutdown=5, log_level="info")
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
