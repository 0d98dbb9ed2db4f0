"""Parameter paths, one convention for the whole package.

A path is a tuple of keys, list indices as ints: ("language_model", "model", "layers", 0, "mlp").
Its dotted form ("language_model.model.layers.0.mlp") is what messages, regexes and HF keys use.
Nested dicts (Orbax items) keep every key as a str; `flatten` turns digit keys back into ints.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from flax import traverse_util


def dotted(path: Iterable) -> str:
    """("a", "layers", 0, "b") -> "a.layers.0.b"."""
    return ".".join(str(p) for p in path)


def parse(key: str) -> tuple:
    """"a.layers.0.b" -> ("a", "layers", 0, "b")."""
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def nest(flat: Mapping[tuple, Any], str_keys: bool = True) -> dict:
    """{("a", "layers", 0, "b"): x} -> {"a": {"layers": {"0": {"b": x}}}}.

    Orbax stores int and str keys under the same names, so either form restores the other;
    `str_keys=False` keeps list indices as ints, the form `nnx.merge` takes."""
    return traverse_util.unflatten_dict({tuple(map(str, p)) if str_keys else tuple(p): v for p, v in flat.items()})


def flatten(nested: Mapping) -> dict[tuple, Any]:
    """Inverse of `nest`; digit keys become ints again (list indices of the model)."""
    flat = traverse_util.flatten_dict(dict(nested))
    return {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p): v for p, v in flat.items()}
