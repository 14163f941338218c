"""Versions of the packages a run depends on (recorded in the run summary and the model card)."""

from __future__ import annotations

from importlib import metadata

FRAMEWORKS = ("distil_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers",
              "datasets", "safetensors", "huggingface_hub")


def package_versions(names=FRAMEWORKS) -> dict:
    """{package: installed version}; packages that are not installed are left out."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out
