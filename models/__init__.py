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
from models.preprocessing import normalize, preprocess, to_pixels
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
    "normalize",
    "preprocess",
    "sha256_file",
    "to_pixels",
    "versions",
]
