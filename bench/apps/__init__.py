"""Baseline servers the benchmark compares nnserve with: `tutorial` and `litserve_floor` run as
`python -m bench.apps.<name> --port P`, the uvicorn apps (`peer_ort`, `http_floor`) under uvicorn's own command
line with `--workers N`, as their users would deploy them."""

import argparse

import numpy as np

from bench.loadgen import HOST

TOP_K = 3

# What the floors answer: shaped like one nnserve classification reply, so response bytes are comparable.
CONSTANT_REPLY = {
    "model": "digits",
    "version": "1",
    "predictions": [
        {
            "index": 7,
            "label": "7",
            "probability": 0.998,
            "top_k": [
                {"index": 7, "label": "7", "probability": 0.998},
                {"index": 2, "label": "2", "probability": 0.001},
                {"index": 3, "label": "3", "probability": 0.0005},
            ],
        }
    ],
}


def command_line(description: str) -> argparse.ArgumentParser:
    """The command line of the baselines started as `python -m bench.apps.<name>`: where to listen, what to load."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=HOST, choices=[HOST])
    parser.add_argument("--model", default="digits,cifar,sequence", help="comma-separated model names")
    parser.add_argument("--models-dir", default=None, help="model repository (default: the project's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return parser


def top_k(probs: np.ndarray, labels: list[str]) -> list[dict[str, object]]:
    """Rows of class probabilities as nnserve's /v1 predictions: the best class and the TOP_K best."""
    predictions = []
    for row in probs:
        ranked = [
            {"index": int(i), "label": labels[int(i)], "probability": round(float(row[i]), 6)}
            for i in np.argsort(-row)[:TOP_K]
        ]
        predictions.append({**ranked[0], "top_k": ranked})
    return predictions
