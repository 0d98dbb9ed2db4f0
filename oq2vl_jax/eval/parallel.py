"""The KV-cache Generator run data-parallel over this process's devices, and option-letter likelihoods.

Parameters are replicated over a 1-D mesh of the local devices and every batch input is sharded along
its batch axis, so jit splits prefill and decode by rows (the batch size must be a multiple of the
device count). Several hosts each run their own share of the questions on their own devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oq2vl_jax.generate import Generator, Prompt, pad_batch, prefill


def local_mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), ("data",))


class DataParallelGenerator(Generator):
    """Generator whose compiled functions run over `mesh` (default: all local devices)."""

    def __init__(self, model, *, mesh: Mesh | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.mesh = mesh or local_mesh()
        self.n_devices = self.mesh.devices.size
        self.state = jax.device_put(self.state, NamedSharding(self.mesh, P()))
        self._rows = NamedSharding(self.mesh, P("data"))

    def _run(self, fn, static, *args):
        # Host arrays with a batch axis go in sharded by rows; device arrays (the cache, PRNG keys)
        # keep the placement the previous call gave them.
        def place(a):
            if isinstance(a, np.ndarray) and a.ndim and a.shape[0] % self.n_devices == 0:
                return jax.device_put(a, self._rows)
            return a

        return super()._run(fn, static, *jax.tree.map(place, args))

    def option_probs(self, prompts: Sequence[Prompt], option_ids: Sequence[int], batch_size: int) -> list[list[float]]:
        """Per prompt, the next-token probabilities of `option_ids` renormalised over them, from one
        forward pass of the prompt (the original's return_string_probabilities: softmax over the whole
        vocabulary at the last prompt position, sliced, divided by the slice's sum)."""
        self._check(prompts)
        batch_size = max(1, min(batch_size, len(prompts)))
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            ids, positions, valid, images = pad_batch(chunk, batch_size, pad_id=self.pad_id,
                                                      image_size=self.cfg.vision.image_size,
                                                      multiple=self.pad_multiple)
            logits, _ = self._run(prefill, {"max_len": ids.shape[1]}, ids, images, positions, valid)
            logits = np.asarray(logits, np.float64)[:len(chunk)]
            logp = logits - logits.max(-1, keepdims=True)
            p = np.exp(logp) / np.exp(logp).sum(-1, keepdims=True)
            sel = p[:, list(option_ids)]
            out.extend((sel / sel.sum(-1, keepdims=True)).tolist())
        return out
