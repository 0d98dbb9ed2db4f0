"""The original's VLM forward written with HF torch modules, differentiable and in any torch dtype:
SiglipVisionModel hidden_states[-2] -> adaptive_avg_pool2d -> Linear/GELU/Linear -> spliced into the
inputs_embeds of Qwen2ForCausalLM. One sample at a time (what a packed row must equal)."""

from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx

from hf_tiny import IMAGE_TOKEN_ID, hf_qwen2, hf_siglip, our_config, state_dict_np
from oq2vl_jax.models import build_abstract, load_hf


class TorchVLM:
    def __init__(self, image_size: int, side: int, vision_act: str = "gelu", dtype=torch.float32, **text):
        self.vision = hf_siglip(vision_act, image_size=image_size)
        self.llm = hf_qwen2(tie=True, **text)
        torch.manual_seed(3)
        d_v, d_t = self.vision.config.hidden_size, self.llm.config.hidden_size
        self.proj = torch.nn.Sequential(torch.nn.Linear(d_v, d_t), torch.nn.GELU(), torch.nn.Linear(d_t, d_t))
        self.side, self.dtype = side, dtype
        for m in self.modules():
            m.to(dtype)

    def modules(self):
        return (self.vision, self.llm, self.proj)

    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """images [n, H, W, 3] float in [-1, 1] -> [n, side*side, text hidden]."""
        pix = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.dtype)
        feats = self.vision(pixel_values=pix, output_hidden_states=True).hidden_states[-2]
        n, t, c = feats.shape
        g = int(round(t ** 0.5))
        pooled = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(n, c, g, g), (self.side, self.side))
        return self.proj(pooled.reshape(n, c, self.side * self.side).transpose(1, 2))

    def logits(self, ids: np.ndarray, images: np.ndarray) -> torch.Tensor:
        """One sample: ids [T] with `side**2` placeholders per image -> logits [T, vocab]."""
        ids_t = torch.from_numpy(ids.astype(np.int64))[None]
        embeds = self.llm.model.embed_tokens(ids_t)
        if len(images):
            embeds = embeds.clone()
            embeds[ids_t == IMAGE_TOKEN_ID] = self.image_embeds(images).reshape(-1, embeds.shape[-1])
        return self.llm(inputs_embeds=embeds).logits[0]

    def loss_sum(self, ids: np.ndarray, loss: np.ndarray, images: np.ndarray) -> tuple[torch.Tensor, int]:
        """(sum of next-token cross entropies over the sample's targets, target count)."""
        logits = self.logits(ids, images).float()
        target = torch.from_numpy(ids[1:].astype(np.int64))
        weight = torch.from_numpy(loss[1:].astype(np.float32))
        nll = F.cross_entropy(logits[:-1], target, reduction="none")
        return (nll * weight).sum(), int(loss[1:].sum())

    def projector_state(self) -> dict[str, np.ndarray]:
        return {f"linear_{i}.{leaf}": getattr(self.proj[j], leaf).detach().float().numpy()
                for i, j in ((1, 0), (2, 2)) for leaf in ("weight", "bias")}

    def parameters_by_component(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """{component: {HF key as weights.ours_to_hf names it: parameter}}."""
        proj = {f"linear_{i}.{leaf}": getattr(self.proj[j], leaf) for i, j in ((1, 0), (2, 2))
                for leaf in ("weight", "bias")}
        vision = {k.removeprefix("vision_model."): p for k, p in self.vision.named_parameters()}
        llm = dict(self.llm.named_parameters())
        return {"vision_tower": vision, "multi_modal_projector": proj, "language_model": llm}

    def ours(self, **overrides):
        """Our model with the same weights (float32 parameters holding the torch values exactly)."""
        cfg = our_config(hf_vision=self.vision, hf_text=self.llm, image_tokens=self.side ** 2, **overrides)
        model = zeros_model(cfg)
        load_hf(model, vision_tower=state_dict_np(self.vision), language_model=state_dict_np(self.llm),
                multi_modal_projector=self.projector_state())
        return model


def zeros_model(cfg):
    """Our model with zero parameters, to be overwritten by load_hf (no random init to compile)."""
    graphdef, abstract = build_abstract(cfg)
    return nnx.merge(graphdef, jax.tree.map(lambda a: jax.numpy.asarray(np.zeros(a.shape, a.dtype)), abstract))


def caption_sample(rng, n_images: int, n_text: int, image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """[bos, (image_tokens x img, newline)*, text..., eos], loss on the text only."""
    ids, loss = [1], [1]
    for _ in range(n_images):
        ids += [IMAGE_TOKEN_ID] * image_tokens + [2]
        loss += [0] * image_tokens + [1]
    ids += list(rng.integers(3, 99, n_text)) + [99]
    loss += [1] * (n_text + 1)
    return np.array(ids, np.int32), np.array(loss, np.int32)


def pack_row(samples, images_per_sample, length: int, slots: int):
    """One packed row (segment ids 1.., positions restarting per sample, zero padding) and its image
    slots in placeholder order."""
    ids, seg, pos, loss = (np.zeros(length, np.int32) for _ in range(4))
    start = 0
    for i, (s_ids, s_loss) in enumerate(samples):
        sl = slice(start, start + len(s_ids))
        ids[sl], seg[sl], pos[sl], loss[sl] = s_ids, i + 1, np.arange(len(s_ids)), s_loss
        start += len(s_ids)
    assert start <= length
    imgs = [im for group in images_per_sample for im in group]
    size = images_per_sample[0].shape[1:]
    images = np.zeros((slots,) + size, np.float32)
    images[:len(imgs)] = imgs
    return dict(input_ids=ids, segment_ids=seg, positions=pos, loss_mask=loss, images=images)
