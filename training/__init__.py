"""Offline training of nnserve's three networks, and their export into the model repository.

`python -m training digits|cifar|sequence` trains one model and writes `models/<name>/<version>/`:
TorchScript and ONNX artifacts, a manifest that the service reads, a state_dict checkpoint and plots.
"""
