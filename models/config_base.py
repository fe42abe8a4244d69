"""One rule for every model config: YAML keys equal constructor arguments, unknown keys raise."""
from __future__ import annotations

from dataclasses import asdict, fields


class StrictConfig:
    """Mixin for dataclass configs: ``from_dict`` rejects unknown keys, ``to_dict`` round-trips."""

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where or cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)
