"""The prior backend contract and registry (no Ray imports).

A backend turns a batch of ``PriorRequest`` into one ``Prior`` per request, in order. It never raises
on bad model output: malformed answers become ``Prior(status=<reason>)`` (see ``records.NO_PRIOR_REASONS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from l2l_ray.config import ConfigError, PriorsConfig
from l2l_ray.records import Prior


@dataclass(frozen=True)
class PriorRequest:
    """One (image, sentence) to ground. Coordinates in the answer are normalised to this image."""

    sent_id: int
    ref_id: int
    image_path: str
    width: int
    height: int
    sentence: str


class PriorBackend(Protocol):
    name: str
    model: str

    def __call__(self, requests: list[PriorRequest]) -> list[Prior]: ...


BACKENDS: dict[str, Callable[[PriorsConfig], PriorBackend]] = {}


def register(name: str):
    """Decorator: ``@register("lexical")`` on a factory ``(PriorsConfig) -> PriorBackend``."""

    def deco(factory):
        BACKENDS[name] = factory
        return factory

    return deco


def build_backend(cfg: PriorsConfig) -> PriorBackend:
    # Importing the modules fills the registry; heavy deps (vllm, transformers) load inside them lazily.
    from l2l_ray.priors import backends  # noqa: F401

    if cfg.backend not in BACKENDS:
        raise ConfigError(f"priors.backend={cfg.backend!r}: registered backends are {sorted(BACKENDS)}")
    return BACKENDS[cfg.backend](cfg)
