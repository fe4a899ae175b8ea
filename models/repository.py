"""The model repository on disk: `<root>/<name>/<version>/{model.onnx, model.pt, manifest.json}`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from models.manifest import MANIFEST_FILE, Manifest, sha256_file

DEFAULT_ROOT = Path(__file__).resolve().parent


class RepositoryError(RuntimeError):
    """The repository on disk does not hold what was asked for, or holds it damaged."""


@dataclass(frozen=True)
class ModelVersion:
    manifest: Manifest
    path: Path

    def artifact_path(self, fmt: str) -> Path:
        try:
            return self.path / self.manifest.artifacts[fmt].file  # type: ignore[index]
        except KeyError:
            raise RepositoryError(f"{self.manifest.name} v{self.manifest.version} has no {fmt} artifact") from None

    def verify(self, formats: Iterable[str] | None = None) -> None:
        """Check the artifacts of `formats` (all by default) against the sha256 their manifest records.

        A server checks only the format it runs: serving images hold model.onnx without model.pt."""
        for fmt, artifact in self.manifest.artifacts.items():
            if formats is not None and fmt not in formats:
                continue
            path = self.path / artifact.file
            if not path.is_file():
                raise RepositoryError(f"{path} is missing")
            if (digest := sha256_file(path)) != artifact.sha256:
                raise RepositoryError(f"{path}: sha256 {digest} does not match the manifest's {artifact.sha256}")


def versions(root: Path, name: str) -> list[str]:
    """The versions of `name` that hold a manifest, oldest first."""
    folder = Path(root) / name
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=int)


def model_names(root: Path) -> list[str]:
    """Every folder that holds numbered version folders: one without a readable manifest is an error at `load`,
    never a model that silently disappears."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and any(v.is_dir() and v.name.isdigit() for v in p.iterdir())
    )


def load(root: Path, name: str, version: str | None = None) -> ModelVersion:
    """Load and validate one version's manifest (the newest when `version` is None)."""
    available = versions(root, name)
    if not available:
        raise RepositoryError(
            f"no model {name!r} with a manifest under {Path(root).resolve()} "
            f"(expected {name}/<version>/{MANIFEST_FILE})"
        )
    version = version or available[-1]
    if version not in available:
        raise RepositoryError(f"model {name!r} has no version {version!r}; available: {', '.join(available)}")
    path = Path(root) / name / version
    try:
        manifest = Manifest.model_validate_json((path / MANIFEST_FILE).read_text())
    except ValueError as e:
        raise RepositoryError(f"{path / MANIFEST_FILE} is not a valid manifest: {e}") from e
    return ModelVersion(manifest=manifest, path=path)


def next_version(root: Path, name: str) -> str:
    """One above the highest numbered folder, manifest or not, so a new version never reuses a folder
    that a run left without a manifest (one trained for export elsewhere, or one whose export failed)."""
    folder = Path(root) / name
    taken = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return str(max(taken, default=0) + 1)
