"""nnserve's model repository: the trained artifacts and the manifest schema that describes them."""

from models.manifest import (
    MANIFEST_FILE,
    Artifact,
    ImagePreprocessing,
    Manifest,
    Metric,
    SeriesSpec,
    TensorSpec,
    TrainingInfo,
    sha256_file,
)
from models.repository import DEFAULT_ROOT, ModelVersion, RepositoryError, load, model_names, next_version, versions

__all__ = [
    "DEFAULT_ROOT",
    "MANIFEST_FILE",
    "Artifact",
    "ImagePreprocessing",
    "Manifest",
    "Metric",
    "ModelVersion",
    "RepositoryError",
    "SeriesSpec",
    "TensorSpec",
    "TrainingInfo",
    "load",
    "model_names",
    "next_version",
    "sha256_file",
    "versions",
]
