"""Serving benchmark: nnserve against a naive server and the floors of its web stack, on real payloads."""
