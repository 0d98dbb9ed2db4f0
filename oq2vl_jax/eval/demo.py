"""Writes the demo benchmark: coloured-shape images (as the demo training data draws them) with questions.

    python -m oq2vl_jax.eval.demo --out DIR [--num 64] [--seed 1]

DIR/mc.jsonl         multiple choice (benchmark demo-mc): "What shape is in the image?" over 4 shapes,
                     "What colour is the shape?" over 4 of the 8 colours; chance 25%
DIR/vqa.jsonl        short-answer VQA (benchmark demo-vqa): shape (4 possible), colour (8), background (8)
DIR/vqa_train.jsonl  the same kind of questions on other images, for few-shot demonstrations
DIR/images/          the PNGs
The seed differs from the training data's so that the evaluation images are new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from oq2vl_jax.data.demo import COLOURS, SHAPES, _scene, draw

VQA_QUESTIONS = (("What shape is in the image?", 0), ("What colour is the shape?", 1),
                 ("What colour is the background?", 2))


def write_demo_benchmark(out: str, num: int = 64, seed: int = 1, image_size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)

    def image(name: str):
        scene = _scene(rng)
        shape, fg, bg = scene
        draw(shape, fg, bg, image_size, rng).save(os.path.join(out, "images", name))
        return f"images/{name}", scene

    mc, vqa, train = [], [], []
    for i in range(num):
        path, (shape, fg, bg) = image(f"q{i:05d}.png")
        if i % 2 == 0:
            options = list(SHAPES)
            question, answer = "What shape is in the image?", shape
        else:
            others = [c for c in COLOURS if c != fg]
            options = [fg] + [others[j] for j in rng.choice(len(others), 3, replace=False)]
            question, answer = "What colour is the shape?", fg
        options = [options[j] for j in rng.permutation(len(options))]
        mc.append({"id": f"mc-{i}", "image": path, "question": question, "options": options,
                   "answer": "ABCD"[options.index(answer)]})
        q, k = VQA_QUESTIONS[i % 3]
        vqa.append({"id": f"vqa-{i}", "image": path, "question": q, "answers": [(shape, fg, bg)[k]] * 10})
    for i in range(max(16, num // 4)):
        path, scene = image(f"t{i:05d}.png")
        q, k = VQA_QUESTIONS[i % 3]
        train.append({"id": f"train-{i}", "image": path, "question": q, "answers": [scene[k]] * 10})
    for name, recs in (("mc", mc), ("vqa", vqa), ("vqa_train", train)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return {"mc": len(mc), "vqa": len(vqa), "train": len(train)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m oq2vl_jax.eval.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=64, help="questions per benchmark")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args(argv)
    n = write_demo_benchmark(a.out, a.num, a.seed, a.image_size)
    print(f"wrote {n['mc']} multiple-choice and {n['vqa']} VQA questions (+{n['train']} train) to {a.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
