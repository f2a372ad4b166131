"""The detection server as a client sees it: a real `tools/serve.py` process on 127.0.0.1 and a
real HTTP client. Detections equal `DefaultPredictor`'s; keys are required; every hostile
input gets its error status and the server keeps answering correctly; the queue and per-key
limits answer 503 / 429 at once."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.config import LazyConfig, instantiate
from detrkit.engine import DefaultPredictor
from detrkit.serving.schemas import DetectionResponse, ErrorResponse, ModelList
from tests.serve_utils import (
    HOST,
    SHAPES_TINY,
    TINY_OVERRIDES,
    ServerProcess,
    metric,
    multipart_head,
    multipart_prefix,
    png_bytes,
    png_claiming,
    random_image,
    send_until_answered,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_QUEUE = 8
PER_KEY = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """Random weights of the tiny model (a fresh seed each run), saved as a checkpoint that
    both the server and the in-test DefaultPredictor load."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(str(SHAPES_TINY)), TINY_OVERRIDES)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = instantiate(cfg.model)
    path = tmp_path_factory.mktemp("serve_ckpt") / "random.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """key_file: from --api-key-file; env: from $DETRKIT_API_KEYS."""
    keys = {"file": secrets.token_urlsafe(24), "env": secrets.token_urlsafe(24)}
    path = tmp_path_factory.mktemp("serve_keys") / "keys.txt"
    path.write_text(f"# test keys\n\n{keys['file']}\n")
    path.chmod(0o600)
    keys["path"] = str(path)
    return keys


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint, keys):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc = ServerProcess(
        [
            "--config-file",
            str(SHAPES_TINY),
            "--api-key-file",
            keys["path"],
            "--max-wait-ms",
            "100",
            "--max-queue",
            str(MAX_QUEUE),
            "--max-inflight-per-key",
            str(PER_KEY),
            "--request-timeout",
            "60",
            *TINY_OVERRIDES,
            f"train.init_checkpoint={checkpoint}",
        ],
        log,
        env={"DETRKIT_API_KEYS": keys["env"]},
    )
    proc.start()
    yield proc
    code = proc.terminate()
    log_text = proc.log()
    assert code == 0, log_text
    for key in (keys["file"], keys["env"]):
        assert key not in log_text  # keys are never logged


@pytest.fixture(scope="module")
def predictor(checkpoint) -> DefaultPredictor:
    cfg = LazyConfig.load(str(SHAPES_TINY))
    cfg = LazyConfig.apply_overrides(cfg, [*TINY_OVERRIDES, f"train.init_checkpoint={checkpoint}"])
    return DefaultPredictor(cfg)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def detect(server, key, data: bytes, timeout: float = 60, **fields) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/detections",
        headers=auth(key),
        files={"image": ("image.png", data, "image/png")},
        data={k: str(v) for k, v in fields.items()},
        timeout=timeout,
    )


def expected_detections(predictor: DefaultPredictor, image: np.ndarray) -> list[dict]:
    """The predictor's detections, mapped to ids and names from its metadata."""
    instances = predictor(image)["instances"]
    to_dataset = {v: k for k, v in predictor.metadata.thing_dataset_id_to_contiguous_id.items()}
    names = predictor.metadata.thing_classes
    return [
        {
            "bbox": box,
            "score": score,
            "category_id": to_dataset[int(c)],
            "label": names[int(c)],
        }
        for box, score, c in zip(
            instances.pred_boxes.tensor.tolist(),
            instances.scores.tolist(),
            instances.pred_classes.tolist(),
        )
    ]


def assert_same_detections(got: list[dict], want: list[dict], tol: float = 1e-4) -> None:
    """Every answered detection matches a distinct expected one (class, score and box within
    `tol`), and there are as many; order among near-equal scores may differ."""
    assert len(got) == len(want)
    unmatched = list(want)
    for det in got:
        for i, cand in enumerate(unmatched):
            if (
                det["category_id"] == cand["category_id"]
                and det["label"] == cand["label"]
                and abs(det["score"] - cand["score"]) < tol
                and np.abs(np.subtract(det["bbox"], cand["bbox"])).max() < tol
            ):
                del unmatched[i]
                break
        else:
            raise AssertionError(f"no expected detection matches {det}; expected {want}")
    scores = [d["score"] for d in got]
    assert scores == sorted(scores, reverse=True)


def check_answer(
    response: httpx.Response, predictor, image: np.ndarray, threshold: float = 0.0, top=1000
):
    assert response.status_code == 200, response.text
    body = response.json()
    DetectionResponse.model_validate(body)  # the documented shape, no extra keys
    assert body["model"] == "shapes_tiny"
    assert body["image"] == {"width": image.shape[1], "height": image.shape[0]}
    assert body["usage"] == {"images": 1}
    want = [d for d in expected_detections(predictor, image) if d["score"] >= threshold][:top]
    assert_same_detections(body["detections"], want)


# ----------------------------------------------------------------------------- answers
def test_detections_equal_default_predictor(server, keys, predictor):
    rng = np.random.default_rng()
    image = random_image(rng, 97, 141)
    response = detect(server, keys["file"], png_bytes(image), score_threshold=0)
    check_answer(response, predictor, image)


def test_json_base64_and_parameters(server, keys, predictor):
    rng = np.random.default_rng()
    image = random_image(rng, 120, 90)
    data = png_bytes(image)
    payload = {"image": base64.b64encode(data).decode(), "score_threshold": 0.0}
    response = httpx.post(
        f"{server.url}/v1/detections", headers=auth(keys["env"]), json=payload, timeout=60
    )
    check_answer(response, predictor, image)
    # a data: URL, a threshold at the median score and a cap on the count
    scores = sorted(d["score"] for d in response.json()["detections"])
    median = scores[len(scores) // 2]
    payload = {
        "image": "data:image/png;base64," + base64.b64encode(data).decode(),
        "score_threshold": median,
        "max_detections": 3,
    }
    response = httpx.post(
        f"{server.url}/v1/detections", headers=auth(keys["env"]), json=payload, timeout=60
    )
    check_answer(response, predictor, image, threshold=median, top=3)
    assert len(response.json()["detections"]) == 3


def test_exif_orientation_applied(server, keys, predictor):
    """A picture stored rotated with EXIF orientation 6 is answered as displayed: size and
    boxes those of the upright picture."""
    rng = np.random.default_rng()
    upright = random_image(rng, 90, 130)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # upright rotated counter-clockwise
    response = detect(server, keys["file"], png_bytes(stored, exif), score_threshold=0)
    check_answer(response, predictor, upright)


def test_concurrent_requests_are_batched_and_equal(server, keys, predictor):
    """Images of different sizes sent at once run in shared batches; each answer equals the
    image's single-image prediction."""
    rng = np.random.default_rng()
    sizes = [(80, 120), (128, 96), (100, 100), (150, 90), (90, 160), (110, 130)]
    images = [random_image(rng, h, w) for h, w in sizes]
    before = server.metrics(auth(keys["file"]))
    request_keys = [keys["file"], keys["env"]] * 3
    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(
            pool.map(
                lambda args: detect(server, args[0], png_bytes(args[1]), score_threshold=0),
                zip(request_keys, images),
            )
        )
    for response, image in zip(responses, images):
        check_answer(response, predictor, image)
    after = server.metrics(auth(keys["file"]))
    batches = metric(after, "detrkit_batch_size_count") - metric(before, "detrkit_batch_size_count")
    batched = metric(after, "detrkit_batch_size_sum") - metric(before, "detrkit_batch_size_sum")
    assert batched == len(images)
    assert batches < len(images), "no two requests shared a batch"


def test_models_list(server, keys):
    response = httpx.get(f"{server.url}/v1/models", headers=auth(keys["file"]), timeout=10)
    assert response.status_code == 200
    body = response.json()
    ModelList.model_validate(body)
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["shapes_tiny"]
    assert abs(body["data"][0]["created"] - time.time()) < 10 * 365 * 86400
    one = httpx.get(f"{server.url}/v1/models/shapes_tiny", headers=auth(keys["file"]), timeout=10)
    assert one.json() == body["data"][0]
    missing = httpx.get(f"{server.url}/v1/models/other", headers=auth(keys["file"]), timeout=10)
    assert missing.status_code == 404
    ErrorResponse.model_validate(missing.json())


def test_health_and_readiness_need_no_key(server):
    assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz", timeout=10).json() == {"status": "ready"}


# ----------------------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "path,method",
    [("/v1/detections", "POST"), ("/v1/models", "GET"), ("/metrics", "GET")],
)
def test_auth_missing_and_wrong_key(server, keys, path, method):
    image = png_bytes(random_image(np.random.default_rng(), 64, 64))
    files = {"image": ("x.png", image, "image/png")} if method == "POST" else None
    wrong = keys["file"][:-1] + ("A" if keys["file"][-1] != "A" else "B")
    for headers, code in [
        ({}, "missing_api_key"),
        (auth(wrong), "invalid_api_key"),
        ({"Authorization": f"Basic {keys['file']}"}, "missing_api_key"),
        (auth(keys["file"] + keys["env"]), "invalid_api_key"),
    ]:
        response = httpx.request(
            method, f"{server.url}{path}", headers=headers, files=files, timeout=30
        )
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        ErrorResponse.model_validate(response.json())
        assert response.json()["error"]["code"] == code
    for key in (keys["file"], keys["env"]):
        response = httpx.request(
            method, f"{server.url}{path}", headers=auth(key), files=files, timeout=60
        )
        assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- hostile input
def _truncated_png() -> bytes:
    data = png_bytes(random_image(np.random.default_rng(), 120, 160))
    return data[: len(data) // 2]


HOSTILE = {
    "garbage": (lambda: b"not an image" + os.urandom(4096), 400, "invalid_image"),
    "truncated_png": (_truncated_png, 400, "invalid_image"),
    "zero_bytes": (lambda: b"", 400, "invalid_image"),
    "png_claiming_50000x50000": (lambda: png_claiming(50000, 50000), 413, "image_too_large"),
    # a GIF header (10x10) and nothing valid after it
    "truncated_gif": (lambda: b"GIF89a\x0a\x00\x0a\x00" + b"\xff" * 8, 400, "invalid_image"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_files(server, keys, name):
    make, status, code = HOSTILE[name]
    response = detect(server, keys["file"], make())
    assert response.status_code == status, response.text
    ErrorResponse.model_validate(response.json())
    assert response.json()["error"]["code"] == code
    # the same bytes in the JSON form
    payload = {"image": base64.b64encode(make()).decode()}
    response = httpx.post(
        f"{server.url}/v1/detections", headers=auth(keys["file"]), json=payload, timeout=60
    )
    assert response.status_code == (status if name != "zero_bytes" else 422), response.text
    ErrorResponse.model_validate(response.json())


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, None),
        ({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, 415, None),
        ({"content": b"{}"}, 415, "unsupported_media_type"),
        ({"json": {"image": "data", "max_detections": -1}}, 422, "invalid_parameter"),
        ({"json": {"image": "aGk=", "score_threshold": 1.5}}, 422, "invalid_parameter"),
        ({"json": {"image": "aGk=", "max_detections": True}}, 422, "invalid_parameter"),
        ({"json": {"image": "aGk=", "detail": "high"}}, 422, "unknown_parameter"),
        ({"json": {"image": "http://127.0.0.1:1/x.png"}}, 422, "url_not_supported"),
        ({"json": ["not", "an", "object"]}, 422, "invalid_body"),
        ({"json": {"image": "%%% not base64 %%%"}}, 400, "invalid_base64"),
        (
            {"content": b'{"image": ', "headers": {"Content-Type": "application/json"}},
            400,
            "invalid_json",
        ),
        ({"files": {"picture": ("x.png", b"abc", "image/png")}}, 422, "unknown_parameter"),
        ({"files": {"image": ("x.png", b"abc")}, "data": {"max_detections": "-3"}}, 422, None),
        ({"files": {"image": ("x.png", b"abc")}, "data": {"score_threshold": "nan"}}, 422, None),
        ({"data": {"image": "not a file"}}, 415, None),
        (
            {
                "content": b'--x\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
            422,
            "missing_image",
        ),
        (
            {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}},
            400,
            "invalid_multipart",
        ),
    ],
)
def test_bad_requests(server, keys, kwargs, status, code):
    headers = {**auth(keys["file"]), **kwargs.pop("headers", {})}
    response = httpx.post(f"{server.url}/v1/detections", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    ErrorResponse.model_validate(response.json())
    if code is not None:
        assert response.json()["error"]["code"] == code


def test_30mb_body_declared_is_refused_before_reading(server, keys):
    """A 30 MB upload with its Content-Length: 413 at once; the body is not read."""
    boundary = "b0undary"
    total = 30 * 10**6
    head = multipart_head(server.port, total, boundary, keys["file"])
    chunks = (os.urandom(64 * 1024) for _ in range(total // (64 * 1024) + 1))
    status, body, sent = send_until_answered(server.port, head, chunks)
    assert status == 413, body
    ErrorResponse.model_validate_json(body)
    assert sent < total


def test_30mb_chunked_body_is_cut_off_while_reading(server, keys):
    """A 30 MB chunked upload (no declared length): 413 once the limit is passed, before the
    server has the whole body."""
    boundary = "b0undary"
    total = 30 * 10**6
    head = multipart_head(server.port, None, boundary, keys["file"])
    piece = os.urandom(256 * 1024)

    def chunks():
        first = multipart_prefix(boundary)
        yield b"%x\r\n%s\r\n" % (len(first), first)
        for _ in range(total // len(piece) + 1):
            yield b"%x\r\n%s\r\n" % (len(piece), piece)

    status, body, sent = send_until_answered(server.port, head, chunks())
    assert status == 413, body
    assert ErrorResponse.model_validate_json(body).error.code == "body_too_large"
    assert sent < total


def test_unknown_route_is_a_json_error(server, keys):
    response = httpx.get(f"{server.url}/v1/nothing", headers=auth(keys["file"]), timeout=10)
    assert response.status_code == 404
    ErrorResponse.model_validate(response.json())
    response = httpx.get(f"{server.url}/v1/detections", headers=auth(keys["file"]), timeout=10)
    assert response.status_code == 405
    ErrorResponse.model_validate(response.json())


# ----------------------------------------------------------------------------- overload
@contextlib.contextmanager
def stalled_uploads(server, key: str, count: int):
    """`count` uploads whose headers and first bytes are sent and whose bodies never finish:
    each holds its place in the queue until the connection closes."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.create_connection((HOST, server.port), timeout=30)
            sock.sendall(multipart_head(server.port, 10_000, "stall", key))
            sock.sendall(multipart_prefix("stall"))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def wait_for_depth(server, key: str, depth: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server.metrics(auth(key)), "detrkit_queue_depth") == depth:
            return
        time.sleep(0.05)
    raise AssertionError(f"queue depth never reached {depth}")


def test_per_key_limit_429_and_full_queue_503(server, keys, predictor):
    image = random_image(np.random.default_rng(), 70, 90)
    data = png_bytes(image)
    closed_before = metric(
        server.metrics(auth(keys["env"])), "detrkit_http_requests_total", status="499"
    )
    with stalled_uploads(server, keys["file"], PER_KEY):
        wait_for_depth(server, keys["env"], PER_KEY)
        response = detect(server, keys["file"], data)
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "too_many_requests_in_flight"
        # another key is still served
        check_answer(detect(server, keys["env"], data, score_threshold=0), predictor, image)
        with stalled_uploads(server, keys["env"], MAX_QUEUE - PER_KEY):
            wait_for_depth(server, keys["env"], MAX_QUEUE)
            for key in (keys["env"], keys["file"]):
                response = detect(server, key, data)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["code"] == "queue_full"
    # the clients that went away gave their places back, each counted as status 499
    wait_for_depth(server, keys["env"], 0)
    deadline = time.monotonic() + 30
    while True:  # each is counted once its handler has returned
        samples = server.metrics(auth(keys["env"]))
        closed = metric(samples, "detrkit_http_requests_total", status="499") - closed_before
        if closed == MAX_QUEUE or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert closed == MAX_QUEUE
    check_answer(detect(server, keys["file"], data, score_threshold=0), predictor, image)


# ----------------------------------------------------------------------------- afterwards
def test_still_correct_after_everything(server, keys, predictor):
    rng = np.random.default_rng()
    for h, w in [(64, 200), (133, 77)]:
        image = random_image(rng, h, w)
        check_answer(
            detect(server, keys["env"], png_bytes(image), score_threshold=0), predictor, image
        )
    samples = server.metrics(auth(keys["file"]))
    assert metric(samples, "detrkit_http_requests_total", status="500") == 0
    assert metric(samples, "detrkit_queue_depth") == 0


def test_openapi_matches_the_server(server, keys):
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    paths = schema["paths"]
    assert {"/v1/models", "/v1/models/{model_id}", "/v1/detections", "/healthz", "/readyz"} <= set(
        paths
    )
    post = paths["/v1/detections"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert content["multipart/form-data"]["schema"]["required"] == ["image"]
    assert set(content["multipart/form-data"]["schema"]["properties"]) == {
        "image",
        "score_threshold",
        "max_detections",
    }
    for status in ("400", "401", "413", "415", "422", "429", "503"):
        ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert post["security"] and "HTTPBearer" in schema["components"]["securitySchemes"]
    components = schema["components"]["schemas"]
    answer = detect(server, keys["file"], png_bytes(random_image(np.random.default_rng(), 64, 64)))
    body = answer.json()
    assert set(components["DetectionResponse"]["required"]) == set(body)
    assert set(components["DetectionResponse"]["properties"]) == set(body)
    assert set(components["DetectionRequest"]["properties"]) == {
        "image",
        "score_threshold",
        "max_detections",
    }
