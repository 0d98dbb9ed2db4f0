"""Model construction (plain, abstract or sharded) and flat parameter access."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from oq2vl_jax.models.config import ModelConfig, Qwen2VLVisionConfig, TextConfig, VisionConfig
from oq2vl_jax.models.qwen2_vl import Qwen2VL
from oq2vl_jax.models.vlm import OQ2VL
from oq2vl_jax.models.weights import hf_to_ours
from oq2vl_jax.sharding import state_shardings, use_mesh
from oq2vl_jax.treepaths import dotted

# Parameters are placed by jit out_shardings (build_sharded), never at creation time: Flax's
# eager sharding would demand a mesh context even for plain single-device models.
nnx.use_eager_sharding(False)

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "Qwen2VLVisionConfig", "OQ2VL", "Qwen2VL", "ARCHS", "model_class", "build", "build_abstract",
           "build_sharded", "build_from_hf", "flat_params", "assign_params", "count_params", "load_hf"]


# model.arch -> the model class; each takes (cfg, rngs=) and shares the batch layout of models/vlm.py.
ARCHS = {"oq2vl": OQ2VL, "qwen2_vl": Qwen2VL}


def model_class(cfg: ModelConfig):
    return ARCHS[cfg.arch]


def build(cfg: ModelConfig, seed: int = 0) -> OQ2VL:
    """A randomly initialised model on the default device."""
    return model_class(cfg)(cfg, rngs=nnx.Rngs(seed))


def build_abstract(cfg: ModelConfig, mesh: Mesh | None = None):
    """(graphdef, abstract state) without allocating; with a mesh the leaves carry NamedShardings."""
    if mesh is None:
        return nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))
    with use_mesh(mesh):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0))))
        shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, state


def build_sharded(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> OQ2VL:
    """A randomly initialised model whose parameters are created directly in their shards."""
    graphdef, abstract = build_abstract(cfg, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    @jax.jit
    def init():
        return nnx.state(model_class(cfg)(cfg, rngs=nnx.Rngs(seed)))

    with use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def flat_params(model_or_state) -> dict[tuple, jax.Array]:
    """{path tuple: array (or ShapeDtypeStruct)} of every nnx.Param."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {path: var.get_value() for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)}


def assign_params(model: OQ2VL, flat: Mapping[tuple, np.ndarray]) -> None:
    """Writes arrays into the model's parameters in place, keeping each parameter's dtype and sharding."""
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if path in flat:
            old = var.get_value()
            new = jnp.asarray(flat[path], dtype=old.dtype)
            if new.shape != old.shape:
                raise ValueError(f"{dotted(path)}: shape {new.shape} != {old.shape}")
            var.set_value(jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new)
    nnx.update(model, state)


def load_hf(model: OQ2VL, **components: Mapping[str, np.ndarray]) -> None:
    """Loads HF state dicts into the model: `vision_tower=` (SiglipVisionModel/SiglipModel/timm),
    `language_model=` (Qwen2ForCausalLM), `multi_modal_projector=` (Llava linear_1/linear_2 keys).

    Each given component must be complete; see weights.hf_to_ours for the errors."""
    params = flat_params(model)
    tie = model.cfg.text.tie_word_embeddings
    for component, sd in components.items():
        assign_params(model, hf_to_ours(component, sd, params, tie_word_embeddings=tie))


def build_from_hf(cfg: ModelConfig, **components: Mapping[str, np.ndarray]):
    """A model whose every parameter comes from the given HF state dicts (see load_hf), built
    without a random initialisation (nothing to compile or compute for it)."""
    from oq2vl_jax.models.weights import WeightError

    graphdef, abstract = build_abstract(cfg)
    params = flat_params(abstract)
    flat = {}
    for component, sd in components.items():
        flat.update(hf_to_ours(component, sd, params, tie_word_embeddings=cfg.text.tie_word_embeddings))
    missing = sorted(".".join(map(str, p)) for p in params.keys() - flat.keys())
    if missing:
        raise WeightError(f"no HF tensor for {len(missing)} parameter(s), e.g. {', '.join(missing[:5])}")
    for path, var in nnx.to_flat_state(abstract):
        var.set_value(jnp.asarray(flat[path], dtype=var.get_value().dtype))
    return nnx.merge(graphdef, abstract)


def count_params(model_or_state) -> int:
    return int(sum(np.prod(v.shape) for v in flat_params(model_or_state).values()))
