"""The HTTP API of a detection server (`create_app`), on FastAPI.

    GET  /v1/models          the served model, in OpenAI's list shape
    GET  /v1/models/{id}     one model card
    POST /v1/detections      multipart `image` file, or JSON {"image": "<base64>"}; optional
                             score_threshold (0..1) and max_detections (1..1000)
    GET  /healthz            the process answers
    GET  /readyz             the model is loaded and warmed up (503 before)
    GET  /metrics            Prometheus text format
    GET  /openapi.json       the schema of all of the above

A detection request goes: API key (401) -> content type (415) -> declared size (413) ->
admission to the bounded queue (503 / 429 at once) -> body read with a byte limit (413) ->
parameters (422) -> decoding and resizing on a thread pool (400 / 413) -> the batching worker
-> the answer. Every error answers `{"error": {"message", "type", "code"}}`.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# run time, and the dependencies they name are local to create_app

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from detrkit import __version__

from .auth import ApiKeyChecker
from .backend import DetectionBackend
from .batching import Admission, BatchingQueue, KeyBusy, QueueFull
from .errors import APIError, error_body
from .limits import LimitedReceive, decode_image, set_pillow_pixel_limit
from .metrics import MetricsMiddleware, ServeMetrics, endpoint_labeller
from .schemas import (
    MAX_DETECTIONS_LIMIT,
    DetectionRequest,
    DetectionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from .settings import ServeSettings

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - the serve extra is missing
    raise ImportError(
        f"detrkit.serving needs the serve extra ({e.name} is missing): "
        "pip install 'detrkit[serve]' (fastapi, uvicorn, python-multipart, prometheus-client)"
    ) from None

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

FORM_FIELDS = ("image", "score_threshold", "max_detections")
ACCEPTED_TYPES = ("multipart/form-data", "application/json")
BODY_OVERHEAD = 64 * 1024  # multipart headers / JSON around the image
RETRY_AFTER = {"Retry-After": "1"}


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def _detection_openapi() -> dict[str, Any]:
    """The request body of POST /v1/detections (read by hand, so declared by hand)."""
    param_props = {
        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "max_detections": {"type": "integer", "minimum": 1, "maximum": MAX_DETECTIONS_LIMIT},
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary"},
                            **param_props,
                        },
                        "additionalProperties": False,
                    }
                },
                "application/json": {"schema": {"$ref": "#/components/schemas/DetectionRequest"}},
            },
        }
    }


# ----------------------------------------------------------------------------- parameters
def _parse_threshold(value: Any, from_form: bool) -> float:
    accepted = "score_threshold must be a number from 0 to 1"
    if from_form:
        try:
            value = float(value)
        except ValueError:
            raise APIError(422, f"{accepted}, got {value!r}", "invalid_parameter") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(422, f"{accepted}, got {value!r}", "invalid_parameter")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise APIError(422, f"{accepted}, got {value!r}", "invalid_parameter")
    return float(value)


def _parse_max_detections(value: Any, from_form: bool) -> int:
    accepted = f"max_detections must be an integer from 1 to {MAX_DETECTIONS_LIMIT}"
    if from_form:
        try:
            value = int(value.strip())
        except ValueError:
            raise APIError(422, f"{accepted}, got {value!r}", "invalid_parameter") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(422, f"{accepted}, got {value!r}", "invalid_parameter")
    if not 1 <= value <= MAX_DETECTIONS_LIMIT:
        raise APIError(422, f"{accepted}, got {value!r}", "invalid_parameter")
    return value


def _parse_params(
    fields: Mapping[str, Any], settings: ServeSettings, from_form: bool
) -> tuple[float, int]:
    unknown = sorted(set(fields) - set(FORM_FIELDS))
    if unknown:
        raise APIError(
            422,
            f"unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(FORM_FIELDS)}",
            "unknown_parameter",
        )
    threshold = fields.get("score_threshold")
    max_det = fields.get("max_detections")
    return (
        settings.default_score_threshold
        if threshold is None
        else _parse_threshold(threshold, from_form),
        settings.default_max_detections
        if max_det is None
        else _parse_max_detections(max_det, from_form),
    )


def _json_request(body: bytes, settings: ServeSettings) -> tuple[bytes, float, int]:
    """A JSON body -> (image bytes, score_threshold, max_detections)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "the body is not valid JSON", "invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(422, 'the JSON body must be an object {"image": "<base64>"}', "invalid_body")
    image = payload.get("image")
    if not isinstance(image, str) or not image:
        raise APIError(
            422, 'the JSON body needs "image": the image file\'s bytes as base64', "missing_image"
        )
    if image.startswith(("http://", "https://", "ftp://", "file:")):
        raise APIError(
            422,
            "image must be the image file's bytes as base64; URLs are not fetched",
            "url_not_supported",
        )
    if image.startswith("data:"):
        header, _, image = image.partition(",")
        if not header.endswith(";base64"):
            raise APIError(422, "a data: URL image must be base64 encoded", "invalid_image_data")
    threshold, max_det = _parse_params(payload, settings, from_form=False)
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image is not valid base64", "invalid_base64") from None
    return data, threshold, max_det


async def _wait_for_disconnect(receive: Callable) -> None:
    """Returns when the client has gone away (the body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# ----------------------------------------------------------------------------- the app
def create_app(
    backend: DetectionBackend,
    settings: ServeSettings | None = None,
    api_keys: list[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving `backend`. Without `api_keys` it serves anyone (the caller
    decides where that is allowed; see `check_bind_address`)."""
    settings = settings or ServeSettings()
    checker = ApiKeyChecker(api_keys) if api_keys else None
    metrics = ServeMetrics(settings.max_batch_size)
    set_pillow_pixel_limit(settings.max_pixels)
    queue = BatchingQueue(
        backend.predict,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        max_per_key=settings.max_inflight_per_key,
        on_batch=metrics.observe_batch,
        on_depth=metrics.queue_depth.set,
        on_drop=metrics.dropped.inc,
    )
    state: dict[str, Any] = {"ready": False, "warmup": None, "pool": None}

    async def warm_up() -> None:
        try:
            start = time.perf_counter()
            await queue.run_on_worker(backend.warmup)
            logger.info("warm-up inference done in %.2f s; ready", time.perf_counter() - start)
            state["ready"] = True
            metrics.ready.set(1)
        except Exception:
            logger.exception("the warm-up inference failed; /readyz stays 503")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["pool"] = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix="detrkit-decode"
        )
        await queue.start()
        state["warmup"] = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            state["ready"] = False
            metrics.ready.set(0)
            state["warmup"].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state["warmup"]
            await queue.stop()
            state["pool"].shutdown(wait=True)

    app = FastAPI(
        title="detrkit detection server",
        version=__version__,
        description="Object detection over HTTP: POST an image, get boxes, scores and labels.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.metrics = metrics
    app.state.settings = settings

    # ------------------------------------------------------------------ errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail), code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return JSONResponse(error_body(422, message, "invalid_parameter"), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body(500, "internal server error", "internal_error"), status_code=500
        )

    # ------------------------------------------------------------------ auth
    bearer = HTTPBearer(auto_error=False, description="an API key of this server")

    async def require_key(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str | None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise APIError(
                401,
                "missing API key; send the header 'Authorization: Bearer <key>'",
                "missing_api_key",
                challenge,
            )
        key_id = checker.check(credentials.credentials)
        if key_id is None:
            raise APIError(401, "invalid API key", "invalid_api_key", challenge)
        return key_id

    async def anonymous() -> str | None:
        return None

    auth = require_key if checker is not None else anonymous

    # ------------------------------------------------------------------ models
    def model_card() -> dict[str, Any]:
        return {
            "id": backend.model_id,
            "object": "model",
            "created": backend.created,
            "owned_by": backend.owned_by,
        }

    @app.get("/v1/models", response_model=ModelList, responses=_error_responses(401))
    async def list_models(key_id: Annotated[str | None, Depends(auth)]) -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get(
        "/v1/models/{model_id}", response_model=ModelCard, responses=_error_responses(401, 404)
    )
    async def get_model(
        model_id: str, key_id: Annotated[str | None, Depends(auth)]
    ) -> dict[str, Any]:
        if model_id != backend.model_id:
            raise APIError(
                404,
                f"model {model_id!r} is not served here; served: {backend.model_id!r}",
                "model_not_found",
            )
        return model_card()

    # ------------------------------------------------------------------ detections
    multipart_limit = settings.max_image_bytes + BODY_OVERHEAD
    json_limit = 4 * math.ceil(settings.max_image_bytes / 3) + BODY_OVERHEAD

    def decode_and_prepare(data: bytes) -> tuple[Any, int, int]:
        image = decode_image(
            data,
            max_pixels=settings.max_pixels,
            max_bytes=settings.max_image_bytes,
            formats=settings.allowed_formats,
        )
        try:
            prepared = backend.prepare(image)
        except Exception:
            logger.debug("preparing a decoded image failed", exc_info=True)
            raise APIError(
                400, "the image could not be converted for the model", "invalid_image"
            ) from None
        return prepared, image.width, image.height

    def json_decode_and_prepare(body: bytes) -> tuple[Any, int, int, float, int]:
        data, threshold, max_det = _json_request(body, settings)
        return (*decode_and_prepare(data), threshold, max_det)

    async def read_request(
        request: Request, media_type: str, limited: LimitedReceive
    ) -> tuple[str, Any, float | None, int | None]:
        """Read the body: ("bytes", image bytes, threshold, max) for multipart, ("json",
        body, None, None) for JSON (parsed on the pool)."""
        reader = Request(request.scope, limited)
        if media_type == "application/json":
            return "json", await reader.body(), None, None
        try:
            form = await reader.form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=1024)
        except (APIError, ClientDisconnect):
            raise
        except StarletteHTTPException as e:
            raise APIError(
                400, f"malformed multipart body: {e.detail}", "invalid_multipart"
            ) from None
        except Exception:
            raise APIError(400, "malformed multipart body", "invalid_multipart") from None
        try:
            fields = {key: value for key, value in form.multi_items()}
            threshold, max_det = _parse_params(
                {k: v for k, v in fields.items() if k != "image"}, settings, from_form=True
            )
            upload = fields.get("image")
            if not isinstance(upload, UploadFile):
                raise APIError(
                    422,
                    "the multipart form needs a file field 'image' (curl: -F image=@photo.jpg)",
                    "missing_image",
                )
            return "bytes", await upload.read(), threshold, max_det
        finally:
            await form.close()

    @app.post(
        "/v1/detections",
        response_model=DetectionResponse,
        responses=_error_responses(400, 401, 408, 413, 415, 422, 429, 503),
        openapi_extra=_detection_openapi(),
        summary="Detect objects in one image",
    )
    async def create_detections(
        request: Request, key_id: Annotated[str | None, Depends(auth)]
    ) -> JSONResponse:
        if not state["ready"]:
            raise APIError(503, "the model is warming up; retry shortly", "not_ready", RETRY_AFTER)
        media_type = _media_type(request)
        if media_type not in ACCEPTED_TYPES:
            raise APIError(
                415,
                f"unsupported content type {media_type or '(none)'!r}; accepted: "
                f"{', '.join(ACCEPTED_TYPES)}",
                "unsupported_media_type",
            )
        limit = json_limit if media_type == "application/json" else multipart_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"request body of {declared} bytes exceeds {limit} bytes (an image of at most "
                f"{settings.max_image_bytes} bytes; server flag --max-image-bytes)",
                "body_too_large",
            )
        try:
            admission = queue.admit(key_id)
        except QueueFull:
            raise APIError(
                503, "the server is at capacity; retry shortly", "queue_full", RETRY_AFTER
            ) from None
        except KeyBusy:
            raise APIError(
                429,
                f"this API key already has {settings.max_inflight_per_key} requests in flight; "
                "retry when one is answered",
                "too_many_requests_in_flight",
                RETRY_AFTER,
            ) from None
        try:
            return await _detect(request, media_type, limit, admission)
        finally:
            admission.release()

    async def _detect(request: Request, media_type: str, limit: int, admission: Admission) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.request_timeout
        limited = LimitedReceive(
            request.receive, limit, f"an image of at most {settings.max_image_bytes} bytes"
        )
        try:
            kind, data, threshold, max_det = await asyncio.wait_for(
                read_request(request, media_type, limited), settings.request_timeout
            )
        except ClientDisconnect:
            return Response(status_code=499)  # gone while uploading; counted as 499
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {settings.request_timeout:g} s",
                "request_timeout",
            ) from None

        pool = state["pool"]
        work = json_decode_and_prepare if kind == "json" else decode_and_prepare
        try:
            decoded = await asyncio.wait_for(
                loop.run_in_executor(pool, work, data), max(deadline - loop.time(), 0.001)
            )
        except asyncio.TimeoutError:
            raise APIError(503, "timed out decoding the image", "timeout", RETRY_AFTER) from None
        del data
        if kind == "json":
            prepared, width, height, threshold, max_det = decoded
        else:
            prepared, width, height = decoded

        result = queue.submit(admission, prepared)
        gone = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            done, _ = await asyncio.wait(
                {result, gone},
                timeout=max(deadline - loop.time(), 0.001),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if result not in done:
            result.cancel()  # the worker drops (and counts) it unless its batch already runs
            if gone in done:
                return Response(status_code=499)  # nobody reads it; counted as 499
            raise APIError(
                503,
                f"the request was not answered within {settings.request_timeout:g} s",
                "timeout",
                RETRY_AFTER,
            )
        try:
            detections = result.result()
        except RuntimeError as e:
            if "shutting down" in str(e):
                raise APIError(503, str(e), "shutting_down", RETRY_AFTER) from None
            raise
        kept = [d for d in detections if d["score"] >= threshold][:max_det]
        metrics.images.inc()
        return JSONResponse(
            {
                "id": f"det-{uuid.uuid4().hex}",
                "model": backend.model_id,
                "created": int(time.time()),
                "image": {"width": width, "height": height},
                "detections": kept,
                "usage": {"images": 1},
            }
        )

    # ------------------------------------------------------------------ operations
    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=HealthResponse, responses=_error_responses(503))
    async def readyz() -> Any:
        if not state["ready"]:
            raise APIError(503, "the model is loading or warming up", "not_ready", RETRY_AFTER)
        return {"status": "ready"}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, **_error_responses(401)},
    )
    async def prometheus_metrics(key_id: Annotated[str | None, Depends(auth)]) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # register the JSON request model in the schema's components
    app.openapi_schema = None
    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["DetectionRequest"] = DetectionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    paths = [route.path for route in app.routes if hasattr(route, "path")]
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoint_of=endpoint_labeller(paths))
    return app
