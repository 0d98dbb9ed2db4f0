"""Prompt formats with a tiny tokenizer, and `python -m oq2vl_jax.generate` end to end on a tiny
checkpoint written with oq2vl_jax.checkpoint (config.yaml + Orbax params + a relative tokenizer path)."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from PIL import Image

from hf_tiny import our_config
from oq2vl_jax import checkpoint
from oq2vl_jax.config import Config
from oq2vl_jax.data.samples import SampleBuilder
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_ids
from oq2vl_jax.generate import encode, generate, main, make_prompts, render_prompt
from oq2vl_jax.models import build, flat_params

K = 4
TEXTS = ["Describe the image.", "A red square on a blue background.", "Question: what colour is it?",
         "Answer the question using a single word or phrase.", "green circle", "yellow triangle"] * 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, model, prepared tokenizer, image paths) of a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("gen")
    build_tiny_tokenizer(TEXTS, str(root / "run" / "tok"), vocab_size=300)
    tok = load_tokenizer(str(root / "run" / "tok"))
    ids = special_ids(tok)
    cfg = our_config(image_tokens=K)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tok)), image_token_id=ids.image)
    model = build(cfg, seed=2)
    run_dir = root / "run"
    checkpoint.save_config(str(run_dir), Config(model=cfg, tokenizer="tok"))  # relative to the run dir
    mngr = checkpoint.make_manager(str(run_dir), async_save=False)
    checkpoint.save(mngr, 5, params=checkpoint.nest(checkpoint.to_numpy(flat_params(model))))
    mngr.wait_until_finished()
    mngr.close()
    rng = np.random.default_rng(0)
    images = []
    for i, size in enumerate([(40, 30), (64, 64), (20, 50)]):
        path = root / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
        images.append(str(path))
    return str(run_dir), model, tok, images


def test_prompt_formats_match_training_layouts(run):
    _, model, tok, _ = run
    cfg, ids = model.cfg, special_ids(tok)
    builder = SampleBuilder(tok, K)

    def ids_of(fmt, prompt, n_images, **kw):
        text, bos = render_prompt(tok, prompt, n_images, fmt, **kw)
        return encode(tok, text, K, cfg.image_token_id, ids.bos if bos else None)

    # caption: the pre-training sample without its <|im_end|>
    assert ids_of("caption", "Describe the image.", 1) == builder.caption("Describe the image.").input_ids[:-1].tolist()
    # chat formats: the SFT sample up to where the assistant's answer starts
    turns = [{"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "green"}]
    for fmt, template in (("chat", "chatml"), ("chat-original", "original")):
        full = SampleBuilder(tok, K, sft_template=template).conversation(turns)
        prompt = ids_of(fmt, "what colour is it?", 1)
        assert prompt == full.input_ids[:len(prompt)].tolist() and full.loss_mask[len(prompt)] == 1, fmt
        assert full.loss_mask[:len(prompt)].sum() == 0
    # fewshot: demonstrations (docs/original_system.md §4), then the query
    shots = [{"image": "a.png", "question": "what colour?", "answer": "red"},
             {"image": "b.png", "question": "what shape?", "answer": "circle"}]
    text, bos = render_prompt(tok, "what is it?", 1, "fewshot", shots=shots)
    q = "<image>\nQuestion: {}\nAnswer the question using a single word or phrase.\nAnswer:"
    assert bos and text == (q.format("what colour?") + " red<|endofchunk|>" + q.format("what shape?")
                            + " circle<|endofchunk|>" + q.format("what is it?"))
    assert ids_of("raw", "plain", 0) == tok("plain", add_special_tokens=False)["input_ids"]


def _cli(capsys, *args):
    assert main(["--checkpoint", args[0], *args[1:]]) == 0
    out = capsys.readouterr()
    return out.out.splitlines(), out.err


def test_cli_end_to_end(run, tmp_path, capsys):
    run_dir, model, tok, images = run
    # One prompt with an image, --json.
    lines, err = _cli(capsys, run_dir, "--prompt", "Describe the image.", "--image", images[0],
                      "--max-new-tokens", "6", "--json")
    assert "tok/s" in err and "step 5" in err
    (obj,) = map(json.loads, lines)
    expected = generate(model, tok, [{"prompt": "Describe the image.", "images": [images[0]]}], max_new_tokens=6)
    assert obj["token_ids"] == expected[0] and 1 <= len(obj["token_ids"]) <= 6
    assert obj["text"] == tok.decode(obj["token_ids"], skip_special_tokens=True)

    # Many requests, chunks of 2 (different prompt lengths and image counts), chat format.
    requests = [{"prompt": "what colour is it?", "images": [images[1]]},
                {"prompt": "<image> and <image>: compare.", "images": [images[0], images[2]]},
                {"prompt": "A red square"}]
    path = tmp_path / "req.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    lines, _ = _cli(capsys, run_dir, "--input", str(path), "--format", "chat", "--max-new-tokens", "5",
                    "--batch-size", "2", "--json")
    got = [json.loads(line)["token_ids"] for line in lines]
    assert got == generate(model, tok, requests, fmt="chat", max_new_tokens=5)

    # Few-shot with demonstrations, plain text output.
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps({"image": im, "question": "what colour?", "answer": a}) + "\n"
                             for im, a in zip(images[:2], ["red", "green"])))
    lines, _ = _cli(capsys, run_dir, "--prompt", "what shape?", "--image", images[2], "--shots", str(shots),
                    "--max-new-tokens", "4")
    shot_list = [json.loads(line) for line in shots.read_text().splitlines()]
    (want,) = generate(model, tok, [{"prompt": "what shape?", "images": [images[2]]}], fmt="fewshot",
                       shots=shot_list, max_new_tokens=4)
    assert lines == [tok.decode(want, skip_special_tokens=True)]
    (p,) = make_prompts(model.cfg, tok, [{"prompt": "what shape?", "images": [images[2]]}], fmt="fewshot",
                        shots=shot_list)
    assert p.images.shape == (3, 56, 56, 3) and np.sum(np.asarray(p.ids) == model.cfg.image_token_id) == 3 * K

    # Sampling is seeded.
    args = ("--prompt", "A red", "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.95", "--json")
    a, _ = _cli(capsys, run_dir, *args, "--seed", "3")
    b, _ = _cli(capsys, run_dir, *args, "--seed", "3")
    assert a == b


def test_cli_rejects_mismatched_images(run, capsys):
    run_dir, _, _, images = run
    with pytest.raises(ValueError, match="image-token slots"):
        main(["--checkpoint", run_dir, "--prompt", "<image> <image>", "--image", images[0], "--format", "raw"])


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "a", "image": "x.png"}', r"req.jsonl:3: .*unknown key\(s\) \['image'\]"),
    ('{"prompt": "a", "images": "x.png"}', r"req.jsonl:3: .*'images' must be a list of images"),
    ('{"prompt": "a",}', r"req.jsonl:3: not JSON"),
    ('["a"]', r"req.jsonl:3: a request is"),
])
def test_cli_names_the_bad_request_line(tmp_path, capsys, line, match):
    # Checked before the model loads: a wrong key must not turn into a confident text-only answer.
    import re

    path = tmp_path / "req.jsonl"
    path.write_text('{"prompt": "ok"}\n\n' + line + "\n")
    assert main(["--checkpoint", str(tmp_path / "no-such-run"), "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and len(err.strip().splitlines()) == 1, err
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"image": "a.png", "question": "q"}\n')
    assert main(["--checkpoint", str(tmp_path / "no-such-run"), "--prompt", "q", "--shots", str(shots)]) == 2
    assert re.search(r"shots.jsonl:1: a shot is", capsys.readouterr().err)


def test_loading_a_checkpoint_logs_no_warnings(run, caplog):
    from oq2vl_jax.generate import load_checkpoint

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.WARNING)  # as in a fresh process, whatever earlier tests lowered it to
    try:
        with caplog.at_level(logging.WARNING):
            _, _, step = load_checkpoint(run[0])
    finally:
        absl.setLevel(level)
    assert step == 5
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
