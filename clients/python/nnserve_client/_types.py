"""Typed results. Unknown fields are kept, so a newer server does not break an older client."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# "item 3: " / "instance 3: ": the server names the item by its place in one request, not among all inputs.
_REQUEST_POSITION = re.compile(r"^(item|instance) \d+: ")


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, protected_namespaces=())


class ClassScore(_Result):
    """One class and the probability the model gives it."""

    index: int
    label: str
    probability: float


class Prediction(_Result):
    """The classification of one image, with the model version that made it."""

    model: str
    version: str
    index: int
    label: str
    probability: float
    top_k: list[ClassScore]

    @model_validator(mode="before")
    @classmethod
    def _probability_from_top_k(cls, data: Any) -> Any:
        # The server lists the winner's probability in top_k only; surface it beside the label.
        if isinstance(data, dict) and "probability" not in data:
            for score in data.get("top_k") or ():
                if score.get("index") == data.get("index"):
                    return {**data, "probability": score.get("probability")}
        return data


class Forecast(_Result):
    """The next `len(values)` values of one series."""

    model_config = ConfigDict(populate_by_name=True)

    model: str
    version: str
    values: list[float] = Field(alias="forecast")
    history_used: int | None = None
    """How many of the most recent history values the model read."""


class ModelInfo(_Result):
    """What `GET /v1/models/{name}` says about one served model; `manifest` is its full manifest."""

    name: str
    version: str
    task: str
    backend: str | None = None
    device: str | None = None
    providers: list[str] = Field(default_factory=list)
    manifest: dict[str, Any] = Field(default_factory=dict)

    @property
    def labels(self) -> list[str] | None:
        """Class labels in output order (classifiers only)."""
        return self.manifest.get("labels")

    @property
    def series(self) -> dict[str, Any] | None:
        """`min_history`, `max_history`, `horizon` and `target` (forecasters only)."""
        return self.manifest.get("series")


class Health(_Result):
    status: str


@dataclass(frozen=True)
class ItemError:
    """An input that got no result from `predict_many` / `forecast_many`; it stands in that input's place.

    `error` is what went wrong: the server's `APIError` (e.g. 400 invalid_image), a `ServerError` for the request
    that carried it, or the local `OSError` / `ValueError` / `TypeError` raised while reading it.
    """

    index: int
    """Position among the inputs, from 0."""
    source: str | None
    """The file name when the input was a path, else None."""
    error: Exception

    @property
    def code(self) -> str:
        """The server's error code, or the local exception's class name."""
        return str(getattr(self.error, "code", type(self.error).__name__))

    @property
    def message(self) -> str:
        """The error's text, without the position inside its request that the server's message may start with."""
        text = str(getattr(self.error, "message", self.error))
        return _REQUEST_POSITION.sub("", text, count=1)

    def __str__(self) -> str:
        return f"{self.source or f'item {self.index}'}: {self.code}: {self.message}"
