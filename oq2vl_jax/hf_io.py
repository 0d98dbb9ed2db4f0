"""Tensor files in and out: safetensors (single or sharded, via the safetensors library) and torch pickles.

Readers are lazy mappings {key: numpy array}: opening one reads only headers, and a tensor is read
when its key is looked up, so a converter holds at most what it has already converted. bf16 comes
back as ml_dtypes.bfloat16 numpy arrays (safetensors' numpy API and torch_to_numpy both use it), so
dtypes survive untouched. torch is imported only for `.bin`/`.pt` files (mmap, weights_only) and is
otherwise not needed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterator, Mapping

import numpy as np

from oq2vl_jax.models.weights import WeightError

SAFE_INDEX = "model.safetensors.index.json"


class LazyTensors(Mapping):
    """{key: numpy array}, each read on lookup by `load(key)`; `source` names where keys come from."""

    def __init__(self, keys, load: Callable[[str], np.ndarray], source: str):
        self._keys = list(keys)
        self._set = set(self._keys)
        self._load = load
        self.source = source

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._set:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def subset(self, prefix: str, strip: bool = True) -> "LazyTensors":
        """The keys under `prefix` (renamed without it when `strip`)."""
        keys = [k for k in self._keys if k.startswith(prefix)]
        names = [k[len(prefix):] if strip else k for k in keys]
        back = dict(zip(names, keys))
        return LazyTensors(names, lambda k: self._load(back[k]), f"{self.source}[{prefix}]")


# -- safetensors --------------------------------------------------------------------------------


def _open_safetensors(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="np")
    except SafetensorError as e:  # safetensors checks the header against the file size and offsets
        raise WeightError(f"cannot read safetensors file {path}: {e} (truncated or not a safetensors file?)") from e


def read_safetensors(paths: list[str]) -> LazyTensors:
    """One lazy mapping over one or more safetensors files (the shards of one checkpoint).

    Each file stays open (memory-mapped by safetensors); a tensor is copied out only when its key is
    looked up, so a converter holds only what it has read.
    """
    handles, owner = {}, {}
    for path in paths:
        handles[path] = _open_safetensors(path)
        for key in handles[path].keys():
            if key in owner:
                raise WeightError(f"tensor {key!r} is stored twice ({owner[key]} and {path})")
            owner[key] = path

    def load(key: str) -> np.ndarray:
        return handles[owner[key]].get_tensor(key)

    return LazyTensors(owner, load, paths[0] if len(paths) == 1 else os.path.dirname(paths[0]))


def read_safetensors_dir(directory: str) -> LazyTensors | None:
    """A HF model directory's safetensors (sharded via the index, or model.safetensors); None if none."""
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise WeightError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        tensors = read_safetensors([os.path.join(directory, f) for f in files])
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise WeightError(f"tensor {unlisted[0]!r} is in the shards but not in {index}")
        return tensors
    single = os.path.join(directory, "model.safetensors")
    return read_safetensors([single]) if os.path.isfile(single) else None


# -- torch pickles -------------------------------------------------------------------------------


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy without copying (bf16 via an int16 view -> ml_dtypes.bfloat16)."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def read_torch(path: str) -> dict:
    """torch.load(mmap=True, weights_only=True): tensors stay on disk until touched."""
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(f"reading {path} (a torch pickle) needs torch; install it or convert the file "
                           "to safetensors first") from e
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise WeightError(f"cannot read torch checkpoint {path}: {e}") from e


def torch_tensors(state_dict: Mapping, source: str) -> LazyTensors:
    """A (flat) torch state dict as a lazy numpy mapping; non-tensor entries are rejected by name."""
    import torch

    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise WeightError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return LazyTensors(state_dict.keys(), lambda k: torch_to_numpy(state_dict[k]), source)


def read_weights_file(path: str) -> LazyTensors:
    """A single weights file: .safetensors, or a torch pickle (.bin/.pt/.pth) holding a state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors([path])
    sd = read_torch(path)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise WeightError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return torch_tensors(sd, path)


def read_model_dir(directory: str, names=("pytorch_model.bin",)) -> LazyTensors:
    """A model directory's weights: safetensors preferred, else the first existing torch file in `names`."""
    tensors = read_safetensors_dir(directory)
    if tensors is not None:
        return tensors
    for name in names:
        if os.path.isfile(os.path.join(directory, name)):
            return read_weights_file(os.path.join(directory, name))
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin.index.json")):
        raise WeightError(f"{directory}: sharded pytorch_model.bin checkpoints are not supported; "
                          "re-save as safetensors")
    raise WeightError(f"{directory}: no weights found (model.safetensors[.index.json] or {', '.join(names)})")


# -- writing ---------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'5GB' / '200MB' / '20KB' / 1234 -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def write_safetensors(tensors: Mapping[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> list[str]:
    """Writes HF-style shards: model.safetensors, or model-0000k-of-0000N.safetensors + the index.

    Values may be views (e.g. transposes): a shard's views are made contiguous while it is written,
    so writing holds at most one shard (max_shard_bytes) of copies. Shards are filled greedily in
    key order.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    shards: list[list[str]] = [[]]
    used = 0
    for key, value in tensors.items():
        if shards[-1] and used + value.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += value.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    os.makedirs(out_dir, exist_ok=True)
    for name, keys in zip(names, shards):
        shard = {k: np.ascontiguousarray(tensors[k]) for k in keys}  # safetensors writes contiguous arrays
        try:
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        except (SafetensorError, TypeError, ValueError) as e:  # e.g. a dtype the format has no name for
            raise WeightError(f"cannot write {name}: {e}") from e
    if n > 1:
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return names


# -- torch-exact initialisation ----------------------------------------------------------------------


def _torch_uniform(raw: np.ndarray, low: float, high: float) -> np.ndarray:
    """torch's CPU float32 uniform_(low, high) from raw 32-bit mt19937 outputs.

    ATen keeps the low 24 bits, scales by 2^-24 and computes x * (high - low) + low, which its CPU
    build contracts into one fused multiply-add; float64 (exact product, one rounding to float32)
    reproduces that bit for bit (checked against torch in tests/test_convert_hf.py).
    """
    low32, high32 = np.float32(low), np.float32(high)
    x = (raw & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0**-24)
    return (x.astype(np.float64) * np.float64(high32 - low32) + np.float64(low32)).astype(np.float32)


def torch_linear_init(seed: int, dims: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias [out]) of consecutive default-initialised torch nn.Linear(in, out) layers
    after torch.manual_seed(seed), without torch.

    torch's CPU generator is the standard mt19937 seeded like numpy's legacy RandomState(seed);
    nn.Linear.reset_parameters draws kaiming_uniform_(a=sqrt(5)) for the weight (bound
    sqrt(3) * sqrt(2 / 6) / sqrt(fan_in)) and then U(±1/sqrt(fan_in)) for the bias.
    """
    rs = np.random.RandomState(seed)
    out = []
    for fan_in, fan_out in dims:
        w_bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + 5)) / math.sqrt(fan_in))
        w = _torch_uniform(rs.randint(0, 2**32, size=fan_in * fan_out, dtype=np.uint32), -w_bound, w_bound)
        b_bound = 1 / math.sqrt(fan_in)
        b = _torch_uniform(rs.randint(0, 2**32, size=fan_out, dtype=np.uint32), -b_bound, b_bound)
        out.append((w.reshape(fan_out, fan_in), b))
    return out
