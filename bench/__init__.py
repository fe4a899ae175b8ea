"""Serving benchmark: nnserve against a FastAPI + ONNX Runtime peer, a tutorial app and the floors of its web
stack, on real payloads."""
