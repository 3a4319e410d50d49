"""The one registry of passes. Filled when worker.passes is imported (each module registers
its class); tests check that every module under worker/passes/ registered exactly one pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.errors import InvalidInput

if TYPE_CHECKING:
    from worker.passes.base import Pass

REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> None:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two passes are named {cls.name!r}: {REGISTRY[cls.name]} and {cls}")
    REGISTRY[cls.name] = cls


def get_pass(name: str) -> type[Pass]:
    import worker.passes  # noqa: F401  (fills REGISTRY)

    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidInput(
            f"unknown step {name!r}",
            code="unknown_step",
            details={"step": name, "known_steps": sorted(REGISTRY)},
        ) from None
