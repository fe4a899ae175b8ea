"""Python SDK for nnserve: classify digits and CIFAR-10 images and forecast series over HTTP.

Speaks HTTP only (httpx), so it installs and imports without torch or the server's code.
"""

from nnserve_client._client import AsyncClient, Client
from nnserve_client._core import Series
from nnserve_client._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    ClientTimeoutError,
    ConnectionError,
    NNServeError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServerError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from nnserve_client._images import ImageInput
from nnserve_client._types import ClassScore, Forecast, Health, ItemError, ModelInfo, Prediction
from nnserve_client._version import __version__

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ClassScore",
    "Client",
    "ClientTimeoutError",
    "ConnectionError",
    "Forecast",
    "Health",
    "ImageInput",
    "ItemError",
    "ModelInfo",
    "NNServeError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "Prediction",
    "RequestTimeoutError",
    "Series",
    "ServerError",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "__version__",
]
