"""One rule for every model config: YAML keys equal constructor arguments, unknown keys and values
of the wrong type raise (with the key, the value and the expected type)."""
from __future__ import annotations

from dataclasses import asdict, fields

_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, tuple)}
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "list": "a list"}


def check_type(key: str, value, expected: str, where: str) -> None:
    """Raise ValueError unless ``value`` fits the annotation name ``expected`` (int, float, bool,
    str, list; others are not checked). bool is not accepted as a number."""
    ok = _TYPES.get(expected)
    if ok is None or value is None:
        return
    if isinstance(value, ok) and not (isinstance(value, bool) and expected in ("int", "float")):
        return
    raise ValueError(f"{where}: {key} must be {_NAMES[expected]}, got {value!r}")


class StrictConfig:
    """Mixin for dataclass configs: ``from_dict`` rejects unknown keys and wrongly typed values,
    ``to_dict`` round-trips."""

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        where = where or cls.__name__
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
        for k, v in d.items():
            check_type(k, v, str(known[k].type), where)
        return cls(**{k: (float(v) if str(known[k].type) == "float" else v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return asdict(self)
