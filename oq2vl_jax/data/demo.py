"""Writes a small, deterministic demo dataset that a tiny VLM can learn: coloured shapes.

    python -m oq2vl_jax.data.demo --out DIR [--num-samples 512] [--image-size 64] [--shard-size 128]

DIR/shards/00000.tar ...   WebDataset shards: {key}.png + {key}.txt ("a red circle on a blue background")
DIR/sft/sft.json           LLaVA-style conversations (images in DIR/sft/images/, a few text-only samples)
DIR/text/text.jsonl        text-only documents ({"text": ...})
DIR/tokenizer/             tiny Qwen2-style BPE tokenizer trained on all of the above
DIR/tokenizer_qwen2vl/     the same with Qwen2-VL's vision tokens and chat template

    python -m oq2vl_jax.data.demo --sft-from 'DIR/shards/{00000..00013}.tar' --out QA_DIR [--seed 0]

QA_DIR/sft.json            LLaVA-style conversations about the given shards' images (QA_DIR/images/), each
                           a question of the demo benchmark (python -m oq2vl_jax.eval.demo) in its exact
                           prompt text, answered as the benchmark expects ("circle", "B"). Pack with
                           `--sft-template plain` (configs/tiny_sft.yaml) so training sees the raw prompt
                           the evaluation sends. Only the shards given are read: keep held-out ones out.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross")
# The demo benchmark's questions (the evaluation and the demo SFT data share them).
VQA_QUESTIONS = (("What shape is in the image?", 0), ("What colour is the shape?", 1),
                 ("What colour is the background?", 2))
_CAPTION = re.compile(r"a (\w+) (\w+) on a (\w+) background")


def draw(shape: str, fg: str, bg: str, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), COLOURS[bg])
    d = ImageDraw.Draw(im)
    r = int(size * rng.uniform(0.2, 0.35))  # random size and position: only colour/shape matter
    cx, cy = (int(rng.integers(r, size - r + 1)) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[fg])
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[fg])
    else:
        w = max(1, r // 3)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=COLOURS[fg])
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=COLOURS[fg])
    return im


def _scene(rng):
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    return str(SHAPES[rng.integers(len(SHAPES))]), names[fg], names[bg]


def mc_question(i: int, scene, rng: np.random.Generator) -> tuple[str, list[str], str]:
    """(question, options, answer letter): even i asks the shape over all 4 shapes, odd i the colour
    over the shape's colour and 3 others; options shuffled."""
    shape, fg, _ = scene
    if i % 2 == 0:
        options, question, answer = list(SHAPES), "What shape is in the image?", shape
    else:
        others = [c for c in COLOURS if c != fg]
        options = [fg] + [others[j] for j in rng.choice(len(others), 3, replace=False)]
        question, answer = "What colour is the shape?", fg
    options = [options[j] for j in rng.permutation(len(options))]
    return question, options, "ABCD"[options.index(answer)]


def write_demo_sft(shards: list[str], out: str, seed: int = 0) -> dict:
    """Two single-turn conversations per image of `shards`: one demo-vqa question (shape, colour,
    background in turn) and one demo-mc question, whose user turn is the benchmark's prompt text."""
    from oq2vl_jax.data.readers import iter_tar
    from oq2vl_jax.eval.benchmarks import build_mc, build_vqa
    from oq2vl_jax.eval.data import Question

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    convs, n = [], 0
    for shard in shards:
        for key, files in iter_tar(shard):
            m = _CAPTION.fullmatch(files.get("txt", b"").decode())
            if m is None or "png" not in files:
                raise ValueError(f"{shard}: sample {key!r} is not a demo sample (png + 'a .. on a .. background')")
            fg, shape, bg = m.groups()
            scene, rel = (shape, fg, bg), f"images/{os.path.basename(key)}.png"
            with open(os.path.join(out, rel), "wb") as f:
                f.write(files["png"])
            q, k = VQA_QUESTIONS[n % 3]
            vqa, _ = build_vqa()(Question(key, q, [rel], answers=[scene[k]]), [])
            q, options, letter = mc_question(n, scene, rng)
            mc, _ = build_mc(Question(key, q, [rel], options=options, answer=letter), [])
            for kind, prompt, answer in (("vqa", vqa, scene[k]), ("mc", mc, letter)):
                convs.append({"id": f"{kind}-{key}", "image": rel, "shard": os.path.basename(shard),
                              "conversations": [{"from": "human", "value": prompt},
                                                {"from": "gpt", "value": answer}]})
            n += 1
    with open(os.path.join(out, "sft.json") + ".tmp", "w") as f:
        json.dump(convs, f, indent=1)
    os.replace(os.path.join(out, "sft.json") + ".tmp", os.path.join(out, "sft.json"))
    return {"images": n, "conversations": len(convs)}


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: byte-identical reruns
    tf.addfile(info, io.BytesIO(data))


def write_demo(out: str, num_samples: int = 512, image_size: int = 64, shard_size: int = 128,
               seed: int = 0, vocab_size: int = 512) -> dict:
    from oq2vl_jax.data.qwen2_vl_text import build_tiny_qwen2_vl_tokenizer
    from oq2vl_jax.data.tokenizer import build_tiny_tokenizer

    rng = np.random.default_rng(seed)
    texts = []
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    shard_paths = []
    for s in range(0, num_samples, shard_size):
        path = os.path.join(out, "shards", f"{s // shard_size:05d}.tar")
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s, min(s + shard_size, num_samples)):
                shape, fg, bg = _scene(rng)
                caption = f"a {fg} {shape} on a {bg} background"
                texts.append(caption)
                _add(tf, f"{i:08d}.png", _png(draw(shape, fg, bg, image_size, rng)))
                _add(tf, f"{i:08d}.txt", caption.encode())
        os.replace(path + ".tmp", path)
        shard_paths.append(path)

    img_dir = os.path.join(out, "sft", "images")
    os.makedirs(img_dir, exist_ok=True)
    sft = []
    for i in range(max(4, num_samples // 4)):
        shape, fg, bg = _scene(rng)
        if i % 8 == 7:  # text-only conversation
            conv = [("What colours are there?", "Red, green, blue, yellow, purple, orange, white and black."),
                    ("Name a shape.", f"A {shape}.")]
            entry = {"id": f"sft-{i:06d}"}
        else:
            rel = f"images/{i:06d}.png"  # relative to the json's folder, the packer's default image root
            draw(shape, fg, bg, image_size, rng).save(os.path.join(out, "sft", rel))
            conv = [("<image>\nWhat shape is in the image?", f"A {fg} {shape}."),
                    ("What colour is the background?", f"The background is {bg}.")][: 1 + i % 2]
            entry = {"id": f"sft-{i:06d}", "image": rel}
        entry["conversations"] = [t for q, a in conv for t in ({"from": "human", "value": q},
                                                               {"from": "gpt", "value": a})]
        texts.extend(t["value"].replace("<image>\n", "") for t in entry["conversations"])
        sft.append(entry)
    with open(os.path.join(out, "sft", "sft.json"), "w") as f:
        json.dump(sft, f, indent=1)

    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    with open(os.path.join(out, "text", "text.jsonl"), "w") as f:
        for _ in range(num_samples):
            shape, fg, bg = _scene(rng)
            doc = f"The {shape} is {fg}. It sits on a {bg} background. A {fg} {shape} is easy to see."
            texts.append(doc)
            f.write(json.dumps({"text": doc}) + "\n")

    # The chat scaffolding too, so SFT rows are not spelled out byte by byte.
    texts += ["system\nYou are a helpful assistant.", "user\n", "assistant\n"] * 50
    tok = build_tiny_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size=vocab_size)
    # The same vocabulary plus Qwen2-VL's <|vision_start|>/<|vision_end|> and chat template
    # (configs/qwen2vl_tiny.yaml).
    build_tiny_qwen2_vl_tokenizer(texts, os.path.join(out, "tokenizer_qwen2vl"), vocab_size=vocab_size)
    return {"shards": shard_paths, "sft": len(sft), "text": num_samples, "tokenizer_len": len(tok)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m oq2vl_jax.data.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sft-from", metavar="SHARDS",
                   help="instead: write OUT/sft.json, benchmark-style questions about these shards' images")
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--image-size", type=int, default=64, help="generated image side (pack resizes later)")
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512)
    a = p.parse_args(argv)
    if a.sft_from:
        from oq2vl_jax.data.readers import expand_braces

        shards = expand_braces(a.sft_from)
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            print(f"error: --sft-from: no such shard {missing[0]}", file=sys.stderr)
            return 2
        info = write_demo_sft(shards, a.out, a.seed)
        print(f"wrote {info['conversations']} conversations about {info['images']} images of {len(shards)} "
              f"shards to {os.path.join(a.out, 'sft.json')}", file=sys.stderr)
        return 0
    info = write_demo(a.out, a.num_samples, a.image_size, a.shard_size, a.seed, a.vocab_size)
    print(f"wrote {len(info['shards'])} shards ({a.num_samples} captioned images), {info['sft']} SFT "
          f"conversations, {info['text']} text docs, tokenizer ({info['tokenizer_len']} tokens) to {a.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
