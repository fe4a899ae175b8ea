"""The figures a model is judged by, on numpy arrays: shared by training's curves and export's manifest."""

from __future__ import annotations

import numpy as np


def forecast_rmse(predictions: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """RMSE over all horizon steps pooled, and at one day ahead."""
    err = predictions.astype(np.float64) - targets.astype(np.float64)
    return float(np.sqrt((err**2).mean())), float(np.sqrt((err[:, 0] ** 2).mean()))


def persistence(histories: np.ndarray, horizon: int) -> np.ndarray:
    """The naive forecast to beat: every future day equals the last one seen."""
    return np.repeat(histories[:, -1:], horizon, axis=1)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix
