"""tools/convert: HF/timm/prismatic -> our checkpoint -> HF, with tiny random models.

Round trips must be bit-identical; exported Llava / pooled Llava directories, loaded by transformers,
must give our logits (float32, 1e-4) on the same processor-made inputs; bad inputs must fail by name.
The CLIs run in-process through their main(argv).
"""

import dataclasses
import json
import os
import shutil
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file

from hf_tiny import hf_qwen2, hf_siglip
from oq2vl_jax import checkpoint
from oq2vl_jax.data.tokenizer import IMAGE_PAD, build_tiny_tokenizer
from oq2vl_jax.hf_io import torch_linear_init
from oq2vl_jax.models import assign_params, build, build_abstract, flat_params
from oq2vl_jax.sharding import make_mesh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "convert"))
import hf_to_jax  # noqa: E402
import jax_to_hf  # noqa: E402

TOL = 1e-4
IMAGE_SIZE = 70  # 5x5 patch grid: identity = 25 tokens, pooled 3x3 = 9 (torch's overlapping bins)
VOCAB = 400
TEXTS = ["a cat sat on the mat", "describe the image please", "hello world, naive cafe 42"] * 10


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(TEXTS, path, vocab_size=300)
    return path


@pytest.fixture(autouse=True)
def _hf_modules_cache(tmp_path, monkeypatch):
    """Remote code is copied into HF_MODULES_CACHE; keep it out of the user's cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def _save_hf(tmp_path, tokenizer_dir, act="gelu_pytorch_tanh", tie=True, llm_dtype=torch.float32, shard=None,
             **llm_overrides):
    """Saves a tiny SigLIP and Qwen2 (+ tokenizer) as HF directories; returns their paths.
    llm_overrides go to the Qwen2 config (e.g. initializer_range)."""
    vision = hf_siglip(act, image_size=IMAGE_SIZE)
    llm = hf_qwen2(tie=tie, vocab_size=VOCAB, **llm_overrides)
    vdir, ldir = str(tmp_path / "vision"), str(tmp_path / "llm")
    vision.save_pretrained(vdir)
    llm.to(llm_dtype).save_pretrained(ldir, **({"max_shard_size": shard} if shard else {}))
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), ldir)
    return vdir, ldir


def _read_safetensors_dir(directory):
    """Every tensor of a HF directory (sharded or not), exactly as stored."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _convert(tmp_path, *args, name="ck"):
    out = str(tmp_path / name)
    assert hf_to_jax.main([*args, "--out", out]) == 0
    return out


def _export(tmp_path, ck, fmt, *args):
    out = str(tmp_path / f"export-{fmt}")
    assert jax_to_hf.main(["--checkpoint", ck, "--out", out, "--format", fmt, *args]) == 0
    return out


def _assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_projector_init_matches_torch_bit_for_bit():
    """The fresh projector equals torch.manual_seed(1152) + nn.Linear defaults at full size, without torch."""
    (w1, b1), (w2, b2) = torch_linear_init(1152, [(1152, 1536), (1536, 1536)])
    torch.manual_seed(1152)
    ref = torch.nn.Sequential(torch.nn.Linear(1152, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 1536))
    for ours, theirs in ((w1, ref[0].weight), (b1, ref[0].bias), (w2, ref[2].weight), (b2, ref[2].bias)):
        np.testing.assert_array_equal(ours, theirs.detach().numpy())


@pytest.mark.parametrize("act,tie,llm_dtype", [
    ("gelu_pytorch_tanh", True, torch.float32), ("gelu_pytorch_tanh", False, torch.bfloat16),
    ("gelu", True, torch.bfloat16), ("gelu", False, torch.float32)])
def test_hf_round_trip_is_bit_identical(tmp_path, tokenizer_dir, act, tie, llm_dtype):
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, act, tie, llm_dtype, shard="20KB")  # sharded input
    assert os.path.isfile(os.path.join(ldir, "model.safetensors.index.json"))
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", "25")

    # dtypes are kept as stored: the LLM's bf16 stays bf16 in our checkpoint.
    _, saved = checkpoint.load_params_as_saved(ck)
    embed = saved["language_model"]["model"]["embed_tokens"]["embedding"]
    assert embed.dtype == (ml_dtypes.bfloat16 if llm_dtype == torch.bfloat16 else np.float32)

    qwen = _export(tmp_path, ck, "qwen2", "--max-shard-size", "30KB")
    assert os.path.isfile(os.path.join(qwen, "model.safetensors.index.json"))
    _assert_same_tensors(_read_safetensors_dir(qwen), _read_safetensors_dir(ldir))
    cfg = json.load(open(os.path.join(qwen, "config.json")))
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 1e6
    assert cfg["tie_word_embeddings"] is tie

    llava = _read_safetensors_dir(_export(tmp_path, ck, "llava"))
    orig_vision = _read_safetensors_dir(vdir)
    assert {k for k in llava if k.startswith("vision_tower.")} == {f"vision_tower.vision_model.{k}" for k in orig_vision}
    for k, v in orig_vision.items():
        np.testing.assert_array_equal(llava[f"vision_tower.vision_model.{k}"], v, err_msg=k)
    (w1, b1), (w2, b2) = torch_linear_init(32, [(32, 32), (32, 32)])  # seed = vision hidden size
    for k, v in {"linear_1.weight": w1, "linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}.items():
        np.testing.assert_array_equal(llava[f"multi_modal_projector.{k}"], v)
    assert ("language_model.lm_head.weight" in llava) is (not tie)


def test_pytorch_bin_llm_and_dtype_cast(tmp_path, tokenizer_dir):
    """A HF directory with pytorch_model.bin (bf16, read through torch's mmap) and --dtype float32."""
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, llm_dtype=torch.bfloat16)
    source = _read_safetensors_dir(ldir)
    os.remove(os.path.join(ldir, "model.safetensors"))
    torch.save(hf_qwen2(tie=True, vocab_size=VOCAB).to(torch.bfloat16).state_dict(),
               os.path.join(ldir, "pytorch_model.bin"))
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", "9", "--dtype", "float32")
    _, saved = checkpoint.load_params_as_saved(ck)
    assert {a.dtype for a in jax.tree.leaves(saved)} == {np.dtype(np.float32)}
    embed = saved["language_model"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(np.asarray(embed), source["model.embed_tokens.weight"].astype(np.float32))


def _our_logits(ck, input_ids, pixel_values):
    """Our model, float32, loaded from a checkpoint directory; pixel_values NCHW as HF takes them."""
    m = checkpoint.resolve_checkpoint_config(ck).model
    m = dataclasses.replace(m, dtype="float32", param_dtype="float32", vision_dtype="float32", remat="none")
    model = build(m)
    _, nested = checkpoint.load_params_as_saved(ck)
    assign_params(model, checkpoint.flatten(nested))
    images = np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)[None]
    ids = np.asarray(input_ids, np.int32)
    return np.asarray(model(ids, images, np.arange(ids.shape[1])[None], np.ones_like(ids)))


@pytest.mark.parametrize("fmt,image_tokens", [("llava", 25), ("pooled-llava", 9)])
def test_exported_vlm_matches_ours_in_transformers(tmp_path, tokenizer_dir, fmt, image_tokens):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, "gelu_pytorch_tanh", tie=True)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", str(image_tokens))
    out = _export(tmp_path, ck, fmt)

    remote = fmt == "pooled-llava"
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=remote)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert int((inputs["input_ids"] == image_id).sum()) == image_tokens
    assert tuple(inputs["pixel_values"].shape) == (1, 3, IMAGE_SIZE, IMAGE_SIZE)

    hf = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=remote).eval()
    assert type(hf).__name__ == ("PooledLlavaForConditionalGeneration" if remote else "LlavaForConditionalGeneration")
    assert hf.config.image_token_id == image_id
    with torch.no_grad():
        ref = hf(**inputs).logits.float().numpy()
    ours = _our_logits(ck, inputs["input_ids"].numpy(), inputs["pixel_values"].numpy())
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


def _hf_to_timm(sd):
    """HF SiglipVisionModel state dict -> timm ViT-SigLIP keys (fused qkv, pos_embed [1, N, D])."""
    out = {"pos_embed": sd["embeddings.position_embedding.weight"][None],
           "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
           "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"],
           "attn_pool.latent": torch.zeros(1, 1, 32)}  # timm's MAP head: not modelled, dropped
    layers = {k.split(".")[2] for k in sd if k.startswith("encoder.layers.")}
    for i in layers:
        p = f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([sd[f"{p}self_attn.{n}_proj.{leaf}"] for n in "qkv"])
            for ours, timm in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.out_proj", "attn.proj"),
                               ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"blocks.{i}.{timm}.{leaf}"] = sd[f"{p}{ours}.{leaf}"]
    return out


@pytest.mark.parametrize("tower_in_checkpoint", [False, True])
def test_prismatic_checkpoint_converts_and_matches(tmp_path, tokenizer_dir, tower_in_checkpoint):
    """A torch.save'd {"model": {"projector", "llm_backbone"[, "vision_backbone"]}} checkpoint, with the
    tower as an open_clip-style timm file, against the original's forward written in torch."""
    vision = hf_siglip("gelu", image_size=IMAGE_SIZE, seed=1)  # timm towers use exact GELU
    llm = hf_qwen2(tie=True, vocab_size=VOCAB, seed=2)
    torch.manual_seed(3)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    vsd = {k: v.clone() for k, v in vision.state_dict().items()}
    timm_file = str(tmp_path / "open_clip_pytorch_model.bin")
    if tower_in_checkpoint:  # the file's tower is some other one; the checkpoint's must win
        other = hf_siglip("gelu", image_size=IMAGE_SIZE, seed=9).state_dict()
        torch.save({f"visual.trunk.{k}": v for k, v in _hf_to_timm(other).items()}, timm_file)
    else:
        timm = {f"visual.trunk.{k}": v for k, v in _hf_to_timm(vsd).items()}
        timm["text.token_embedding.weight"] = torch.zeros(4, 4)  # open_clip's text tower: ignored
        torch.save(timm, timm_file)
    model = {"projector": {f"mlp_projector.{k}": v for k, v in proj.state_dict().items()},
             "llm_backbone": {f"llm.{k}": v for k, v in llm.state_dict().items()}}  # incl. tied lm_head
    if tower_in_checkpoint:
        model["vision_backbone"] = {f"featurizer.{k}": v for k, v in _hf_to_timm(vsd).items()}
    torch.save({"model": model}, str(tmp_path / "latest-checkpoint.pt"))
    _, ldir = _save_hf(tmp_path, tokenizer_dir)  # only its config and tokenizer are used

    ck = _convert(tmp_path, "--vision", timm_file, "--llm", ldir, "--oq-checkpoint",
                  str(tmp_path / "latest-checkpoint.pt"), "--image-tokens", "9", "--vision-heads", "4",
                  "--vision-image-size", str(IMAGE_SIZE))
    m = checkpoint.resolve_checkpoint_config(ck).model
    assert m.vision.hidden_act == "gelu" and m.vision.num_hidden_layers == 3 and m.image_tokens == 9

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    ids = np.array([[1, *[m.image_token_id] * 9, 5, 17, 33, 2]], np.int64)
    with torch.no_grad():  # the original: hidden_states[-2] -> adaptive pool 5->3 -> MLP -> splice -> Qwen2
        feats = vision(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2]
        pooled = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(1, 32, 5, 5), (3, 3)).flatten(2).transpose(1, 2)
        embeds = llm.model.embed_tokens(torch.from_numpy(ids))
        embeds[torch.from_numpy(ids) == m.image_token_id] = proj(pooled).reshape(-1, 32)
        ref = llm(inputs_embeds=embeds).logits.numpy()
    np.testing.assert_allclose(_our_logits(ck, ids, pixels), ref, atol=TOL, rtol=0)


def test_prismatic_untied_head_mismatch_is_refused(tmp_path, tokenizer_dir, capsys):
    llm = hf_qwen2(tie=True, vocab_size=VOCAB)
    sd = {f"llm.{k}": v.clone() for k, v in llm.state_dict().items()}
    sd["llm.lm_head.weight"] += 1  # a tied config cannot hold a different head
    proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    torch.save({"model": {"projector": {f"mlp_projector.{k}": v for k, v in proj.state_dict().items()},
                          "llm_backbone": sd}}, str(tmp_path / "ck.pt"))
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir)
    rc = hf_to_jax.main(["--vision", vdir, "--llm", ldir, "--oq-checkpoint", str(tmp_path / "ck.pt"),
                         "--image-tokens", "9", "--out", str(tmp_path / "out")])
    assert rc == 2 and "lm_head.weight differs" in capsys.readouterr().err


def test_checkpoint_is_portable_and_loads_onto_a_training_mesh(tmp_path, tokenizer_dir):
    """config.yaml's relative tokenizer follows the directory; restore casts to the model's param dtype
    and places the weights on an 8-device FSDP mesh."""
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, llm_dtype=torch.bfloat16)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", "9")
    moved = shutil.move(ck, str(tmp_path / "moved"))
    cfg = checkpoint.resolve_checkpoint_config(moved)
    assert cfg.tokenizer == os.path.join(moved, "tokenizer")
    assert cfg.model.image_token_id == hf_to_jax.load_prepared_tokenizer(cfg.tokenizer)[1].image

    mesh = make_mesh(fsdp=8)
    _, abstract = build_abstract(cfg.model, mesh)  # param_dtype float32
    _, params = checkpoint.load_params(moved, checkpoint.nest(flat_params(abstract)))
    embed = params["language_model"]["model"]["embed_tokens"]["embedding"]
    assert embed.dtype == np.float32 and len(embed.sharding.device_set) == 8
    source = _read_safetensors_dir(ldir)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(embed), source.astype(np.float32))


def test_export_reads_a_checkpoint_saved_from_a_sharded_mesh(tmp_path, tokenizer_dir):
    """A training-style checkpoint (float32 arrays sharded over a 4x2 mesh, a later step) exports on one
    CPU device."""
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, tie=False)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", "9")
    cfg = checkpoint.resolve_checkpoint_config(ck)
    _, abstract = build_abstract(cfg.model, make_mesh(fsdp=4, tensor=2))
    shardings = {p: a.sharding for p, a in flat_params(abstract).items()}
    _, nested = checkpoint.load_params_as_saved(ck)
    sharded = {p: jax.device_put(np.asarray(v, np.float32), shardings[p]) for p, v in checkpoint.flatten(nested).items()}
    assert any(len(a.sharding.device_set) == 8 for a in sharded.values())
    run = str(tmp_path / "run")
    # A training run names a stock (unprepared) tokenizer directory, as configs/tiny.yaml does.
    checkpoint.save_config(run, dataclasses.replace(cfg, tokenizer=tokenizer_dir))
    mngr = checkpoint.make_manager(run, async_save=False)
    checkpoint.save(mngr, 7, params=checkpoint.nest(sharded))
    mngr.wait_until_finished()
    mngr.close()
    out = _export(tmp_path, run, "qwen2", "--step", "7")
    _assert_same_tensors(_read_safetensors_dir(out), _read_safetensors_dir(ldir))
    # The export carries the tokenizer as training prepared it: "<s>" is one special token, the bos.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.bos_token == "<s>" and tok("<s>")["input_ids"] == [tok.bos_token_id]
    assert len(tok("<|endofchunk|>")["input_ids"]) == 1


# -- bad inputs ----------------------------------------------------------------------------------------


def _fails(capsys, main, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_directories_are_named(tmp_path, tokenizer_dir, capsys):
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir)
    out = ["--image-tokens", "9", "--out", str(tmp_path / "out")]
    _fails(capsys, hf_to_jax.main, ["--vision", vdir, "--llm", vdir, *out], "siglip_vision_model", "not qwen2")
    _fails(capsys, hf_to_jax.main, ["--vision", ldir, "--llm", ldir, *out], "qwen2", "not a SigLIP")
    _fails(capsys, hf_to_jax.main, ["--vision", str(tmp_path / "nope"), "--llm", ldir, *out], "does not exist")
    _fails(capsys, hf_to_jax.main, ["--vision", str(tmp_path), "--llm", ldir, *out], "config.json")
    _fails(capsys, jax_to_hf.main, ["--checkpoint", vdir, "--out", str(tmp_path / "x"), "--format", "qwen2"],
           "not a checkpoint directory")
    assert not os.path.exists(tmp_path / "out")


def _rewrite(path, change):
    """Rewrites a safetensors file with `change(dict)` applied."""
    with safe_open(path, "np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    change(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_wrong_missing_or_extra_tensors_are_named(tmp_path, tokenizer_dir, capsys):
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir)
    weights = os.path.join(ldir, "model.safetensors")
    pristine = open(weights, "rb").read()
    argv = ["--vision", vdir, "--llm", ldir, "--image-tokens", "9", "--out", str(tmp_path / "out")]
    key = "model.layers.1.self_attn.k_proj.weight"

    _rewrite(weights, lambda sd: sd.__setitem__(key, sd[key][:8]))
    _fails(capsys, hf_to_jax.main, argv, key, "shape (8, 32)")
    open(weights, "wb").write(pristine)
    _rewrite(weights, lambda sd: sd.pop(key))
    _fails(capsys, hf_to_jax.main, argv, "missing", "language_model.model.layers.1.self_attn.k_proj.kernel")
    open(weights, "wb").write(pristine)
    _rewrite(weights, lambda sd: sd.__setitem__("model.layers.9.mlp.up_proj.weight", sd[key]))
    _fails(capsys, hf_to_jax.main, argv, "unexpected tensor 'model.layers.9.mlp.up_proj.weight'")
    open(weights, "wb").write(pristine[: len(pristine) // 2])
    _fails(capsys, hf_to_jax.main, argv, weights, "truncated")


def test_export_refuses_what_the_format_cannot_express(tmp_path, tokenizer_dir, capsys):
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", "9")
    out = ["--out", str(tmp_path / "x")]
    _fails(capsys, jax_to_hf.main, ["--checkpoint", ck, *out, "--format", "llava"], "identity pooling", "pooled-llava")
    _fails(capsys, jax_to_hf.main, ["--checkpoint", ck, *out, "--format", "qwen2", "--step", "3"], "step 3")
    _fails(capsys, hf_to_jax.main, ["--vision", vdir, "--llm", ldir, "--image-tokens", "9", "--out", ck],
           "already holds a checkpoint")
    # A failure while building any file of the export leaves nothing behind.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax_to_hf, "generation_config", lambda ids: (_ for _ in ()).throw(ValueError("boom")))
        _fails(capsys, jax_to_hf.main, ["--checkpoint", ck, *out, "--format", "pooled-llava"], "boom")
    assert not os.path.exists(tmp_path / "x")


def _prismatic_file(path, llm, tower=None):
    proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32))
    model = {"projector": {f"mlp_projector.{k}": v for k, v in proj.state_dict().items()}, "llm_backbone": llm}
    if tower is not None:
        model["vision_backbone"] = tower
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model}, path)


def test_prismatic_run_config_sets_image_tokens_and_exact_gelu(tmp_path, tokenizer_dir, capsys):
    """RUN/config.json's arch_specifier gives the token count; the original's LLM was trained on the
    exact-GELU timm tower, so an HF SigLIP --vision runs with exact GELU unless --vision-act says otherwise."""
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, "gelu_pytorch_tanh")
    llm = {f"llm.{k}": v for k, v in hf_qwen2(tie=True, vocab_size=VOCAB).state_dict().items()}
    ck_file = str(tmp_path / "run" / "checkpoints" / "latest-checkpoint.pt")
    _prismatic_file(ck_file, llm)
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump({"model": {"arch_specifier": "full-align+25-avgpool"}}, f)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--oq-checkpoint", ck_file)
    m = checkpoint.resolve_checkpoint_config(ck).model
    assert m.image_tokens == 25 and m.vision.hidden_act == "gelu"
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--oq-checkpoint", ck_file,
                  "--vision-act", "gelu_pytorch_tanh", name="tanh")
    assert checkpoint.resolve_checkpoint_config(ck).model.vision.hidden_act == "gelu_pytorch_tanh"
    _fails(capsys, hf_to_jax.main, ["--vision", vdir, "--llm", ldir, "--oq-checkpoint", ck_file,
                                    "--image-tokens", "9", "--out", str(tmp_path / "x")], "run config says 25")
    for arch, tokens in (("no-align+avgpool", 144), ("full-align+729-avgpool", 729)):
        with open(tmp_path / "run" / "config.json", "w") as f:
            json.dump({"model": {"arch_specifier": arch}}, f)
        assert hf_to_jax.oq_image_tokens(ck_file) == tokens
    with open(tmp_path / "run" / "config.json", "w") as f:
        json.dump({"model": {"arch_specifier": "no-align+gelu-mlp"}}, f)
    _fails(capsys, hf_to_jax.main, ["--vision", vdir, "--llm", ldir, "--oq-checkpoint", ck_file,
                                    "--out", str(tmp_path / "x")], "'no-align+gelu-mlp' is not an avgpool")


def test_prismatic_bad_tensors_are_named(tmp_path, tokenizer_dir, capsys):
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir)
    llm = {f"llm.{k}": v for k, v in hf_qwen2(tie=True, vocab_size=VOCAB).state_dict().items()}
    args = ["--vision", vdir, "--llm", ldir, "--image-tokens", "9", "--out", str(tmp_path / "x")]
    # A tied head saved without the embedding: the embedding is named as missing (not a KeyError).
    _prismatic_file(str(tmp_path / "a.pt"), {k: v for k, v in llm.items() if "embed_tokens" not in k})
    _fails(capsys, hf_to_jax.main, [*args, "--oq-checkpoint", str(tmp_path / "a.pt")], "missing", "embed_tokens")
    # A fused timm qkv that is not 3 x hidden rows.
    tower = {f"featurizer.{k}": v for k, v in _hf_to_timm(hf_siglip("gelu", image_size=IMAGE_SIZE).state_dict()).items()}
    tower["featurizer.blocks.0.attn.qkv.weight"] = tower["featurizer.blocks.0.attn.qkv.weight"][:-1]
    _prismatic_file(str(tmp_path / "b.pt"), llm, tower)
    _fails(capsys, hf_to_jax.main, [*args, "--oq-checkpoint", str(tmp_path / "b.pt")],
           "'blocks.0.attn.qkv.weight' has shape (95, 32)")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("tie", [True, False])
def test_prismatic_export_round_trips(tmp_path, tokenizer_dir, tie):
    """ours -> latest-checkpoint.pt (float32, torch layouts, tied head written) -> ours: bit-identical."""
    vdir, ldir = _save_hf(tmp_path, tokenizer_dir, "gelu", tie=tie, llm_dtype=torch.bfloat16)
    ck = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--image-tokens", "9")
    out = _export(tmp_path, ck, "prismatic")
    ck_file = os.path.join(out, "checkpoints", "latest-checkpoint.pt")
    model = torch.load(ck_file, weights_only=True)["model"]
    assert sorted(model) == ["llm_backbone", "projector"]
    assert sorted(model["projector"]) == [f"mlp_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    llm = model["llm_backbone"]
    assert all(v.dtype == torch.float32 for v in llm.values())
    want = {k: v.bfloat16().float() for k, v in hf_qwen2(tie=tie, vocab_size=VOCAB).state_dict().items()}
    assert sorted(llm) == sorted(f"llm.{k}" for k in want) and "llm.lm_head.weight" in llm
    for k, v in want.items():
        torch.testing.assert_close(llm[f"llm.{k}"], v, rtol=0, atol=0, msg=k)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == {"model": {"arch_specifier": "full-align+9-avgpool"}}

    back = _convert(tmp_path, "--vision", vdir, "--llm", ldir, "--oq-checkpoint", ck_file, "--dtype", "float32",
                    name="back")
    assert checkpoint.resolve_checkpoint_config(back).model.image_tokens == 9
    a, b = (checkpoint.flatten(checkpoint.load_params_as_saved(d, None)[1]) for d in (ck, back))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]).astype(np.float32), err_msg=str(k))
