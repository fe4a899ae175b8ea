"""nnserve's HTTP service: LitServe workers over the model repository."""
