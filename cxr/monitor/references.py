"""The baseline and model package of each model version found in captured traffic.

A variant's traffic is compared with the baseline of the model version that served it, and SageMaker-native
records are featurized with that version's own package. Both live in the version's folder of the model
registry (local or SageMaker: `baseline.npz` and `model.tar.gz`, put there by the train flow's register
step). With an explicit baseline directory every version uses that directory instead. A version that has
no baseline gets the reason, never another model's baseline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cxr.monitor.baseline import Baseline
from cxr.registry import ModelRegistry, RegistryError

PACKAGE = "model.tar.gz"


class References:
    """Where each model version's baseline and package are: its registry folder, or one directory."""

    def __init__(self, registry: ModelRegistry | None = None, directory: str | Path | None = None):
        if (registry is None) == (directory is None):
            raise ValueError("give either a registry or a baseline directory")
        self.registry, self.directory = registry, directory
        self._folders: dict[str, Path | str] = {}

    def folder(self, version: str) -> Path | str:
        """The folder holding `version`'s files, or why there is none."""
        if version not in self._folders:
            self._folders[version] = self._find(version)
        return self._folders[version]

    def _find(self, version: str) -> Path | str:
        registry = self.registry
        if registry is None:
            return Path(str(self.directory))
        if version in ("None", ""):
            return (
                "these records name no model version (the serving container's response carries none); "
                "give the version this variant serves (variant_versions)"
            )
        if not version.isdigit():
            return f"model version {version!r} is not a version number of registry group {registry.group!r}"
        try:
            return registry.get(int(version)).directory
        except RegistryError:
            return f"model version {version} is not in registry group {registry.group!r}"

    def package(self, version: str) -> Path | None:
        """`version`'s model package, or None when it has none."""
        folder = self.folder(version)
        return folder / PACKAGE if isinstance(folder, Path) and (folder / PACKAGE).is_file() else None

    def baseline(self, version: str) -> Baseline | str:
        """`version`'s monitoring baseline, or why there is none."""
        folder = self.folder(version)
        if isinstance(folder, str):
            return folder
        try:
            return Baseline.load(folder)
        except FileNotFoundError:
            where = "in the registry" if self.directory is None else f"in {folder}"
            return f"model version {version} has no monitoring baseline (baseline.npz) {where}"

    def baselines(self, versions: Iterable[str]) -> dict[str, Baseline | str]:
        """Each version's baseline, or why there is none."""
        return {version: self.baseline(version) for version in versions}
