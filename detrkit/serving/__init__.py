"""Serving detections over HTTP: an app factory (`create_app`), API-key auth, input limits, a
bounded batching queue and Prometheus metrics. Needs the serve extra (fastapi, uvicorn,
python-multipart, prometheus-client); `tools/serve.py` is the command line.

Nothing here knows a particular model: the app runs any `DetectionBackend`;
`PredictorBackend` adapts `DefaultPredictor` (any config the predictor loads).
"""

from .auth import ApiKeyChecker, AuthConfigError, check_bind_address, load_api_keys
from .batching import BatchingQueue, KeyBusy, QueueFull
from .errors import APIError
from .settings import ServeSettings, SettingsError, parse_byte_size, parse_count

__all__ = [
    "APIError",
    "ApiKeyChecker",
    "AuthConfigError",
    "BatchingQueue",
    "KeyBusy",
    "QueueFull",
    "ServeSettings",
    "SettingsError",
    "check_bind_address",
    "load_api_keys",
    "parse_byte_size",
    "parse_count",
]
