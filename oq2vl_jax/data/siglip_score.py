"""SigLIP image-text cosine, DataComp's CLIP-score baseline with SigLIP's two towers.

The towers come from tools/convert/hf_to_jax.py --siglip (a HF SiglipModel, e.g.
siglip-so400m-patch14-384): DIR/siglip.json (our configs), DIR/model.safetensors (our parameter
names) and DIR/tokenizer (the HF one). Captions are tokenized as SigLIP was trained: padded (and cut)
to max_position_embeddings tokens, no attention mask. Images: RGB, bicubic squash to the tower's size,
(x/255 - 0.5)/0.5, SigLIP's processor. Batches are split over the local devices.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

CONFIG, WEIGHTS, TOKENIZER = "siglip.json", "model.safetensors", "tokenizer"


def load_siglip_pair(directory: str, dtype: str | None = None):
    """(SiglipPair on the default device, its SiglipPairConfig) from a converted directory."""
    import jax
    from flax import nnx

    from oq2vl_jax.hf_io import read_safetensors
    from oq2vl_jax.models.layers import dtype_of
    from oq2vl_jax.models.siglip_text import SiglipPair, SiglipPairConfig
    from oq2vl_jax.models.weights import WeightError

    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG}; convert a HF SiglipModel with "
                                "tools/convert/hf_to_jax.py --siglip DIR --out OUT")
    with open(path) as f:
        cfg = SiglipPairConfig.from_dict(json.load(f))
    kw = {} if dtype is None else {"dtype": dtype_of(dtype)}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SiglipPair(cfg, rngs=nnx.Rngs(0), **kw)))
    tensors = read_safetensors([os.path.join(directory, WEIGHTS)])
    for p, var in nnx.to_flat_state(abstract):
        key = ".".join(map(str, p))
        if key not in tensors:
            raise WeightError(f"{directory}/{WEIGHTS} has no tensor {key!r}")
        var.set_value(jax.device_put(np.asarray(tensors[key])))
    return nnx.merge(graphdef, abstract), cfg


class SiglipScorer:
    """Cosines of (PIL image, caption) pairs, batch_size rows per step split over the local devices."""

    def __init__(self, directory: str, *, batch_size: int = 64, dtype: str | None = None, devices=None):
        import jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from transformers import AutoTokenizer

        model, self.cfg = load_siglip_pair(directory, dtype)
        self.tok = AutoTokenizer.from_pretrained(os.path.join(directory, TOKENIZER))
        devices = list(devices or jax.local_devices())
        mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = -(-max(batch_size, 1) // len(devices)) * len(devices)
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(mesh, P()))
        split = NamedSharding(mesh, P("data"))
        self._split = split

        @jax.jit
        def cosine(state, pixels, ids):
            return nnx.merge(graphdef, state).cosine(pixels, ids)

        self._cosine = cosine

    def token_ids(self, captions: Sequence[str]) -> np.ndarray:
        n = self.cfg.text.max_position_embeddings
        return np.asarray(self.tok(list(captions), padding="max_length", max_length=n, truncation=True)["input_ids"],
                          np.int32)

    def score(self, images: Sequence, captions: Sequence[str], mapper=None) -> list[float]:
        """Cosines in order; `mapper` (a thread pool's map) resizes the images in parallel."""
        import jax

        from oq2vl_jax.generate import load_image

        size, out = self.cfg.vision.image_size, []
        mapper = mapper or (lambda f, xs: list(map(f, xs)))
        for start in range(0, len(captions), self.batch_size):
            caps = list(captions[start:start + self.batch_size])
            pixels = np.stack(mapper(lambda im: load_image(im, size), list(images[start:start + self.batch_size])))
            ids = self.token_ids(caps)
            pad = self.batch_size - len(caps)  # one shape for every batch
            pixels = np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], pixels.dtype)])
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
            cos = self._cosine(self._state, jax.device_put(pixels, self._split), jax.device_put(ids, self._split))
            out.extend(float(c) for c in np.asarray(cos)[:len(caps)])
        return out
