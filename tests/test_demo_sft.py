"""The demo SFT data: built from the training shards only, in the demo benchmark's own prompt text, and
packed (plain template) into exactly the tokens the evaluation feeds, followed by the answer."""

import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from oq2vl_jax.data.demo import COLOURS, SHAPES, write_demo, write_demo_sft
from oq2vl_jax.data.samples import SampleBuilder
from oq2vl_jax.data.tokenizer import load_tokenizer, special_ids
from oq2vl_jax.eval import benchmarks as B
from oq2vl_jax.eval.data import read_questions
from oq2vl_jax.eval.demo import write_demo_benchmark
from oq2vl_jax.generate import encode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(str(root / "data"), num_samples=64, shard_size=16, vocab_size=300)  # shards 00000..00003
    shards = [str(root / "data" / "shards" / f"{i:05d}.tar") for i in range(3)]  # 00003 held out
    info = write_demo_sft(shards, str(root / "qa"))
    with open(root / "qa" / "sft.json") as f:
        return root, info, json.load(f)


def _tar_pngs(path):
    with tarfile.open(path) as tf:
        return {tf.extractfile(m).read() for m in tf if m.name.endswith(".png")}


def _masked(prompt):  # the prompt's form, with the option texts blanked
    return re.sub(r"\n([A-D])\. \w+", r"\n\1. _", prompt)


def test_sft_images_are_the_training_shards_images_and_none_of_the_held_out(demo):
    root, info, convs = demo
    train = set().union(*(_tar_pngs(root / "data" / "shards" / f"{i:05d}.tar") for i in range(3)))
    held_out = _tar_pngs(root / "data" / "shards" / "00003.tar")
    used = set()
    for c in convs:
        with open(root / "qa" / c["image"], "rb") as f:
            used.add(f.read())
    assert info == {"images": 48, "conversations": 96} and len(convs) == 96
    assert used == train and not used & held_out
    assert {c["shard"] for c in convs} == {"00000.tar", "00001.tar", "00002.tar"}


def test_sft_questions_are_the_benchmark_prompts_with_right_answers(demo, tmp_path):
    root, _, convs = demo
    write_demo_benchmark(str(tmp_path), num=24, seed=3)
    bench = set()
    for name in ("demo-mc", "demo-vqa"):
        b = B.get(name)
        qs, _ = read_questions(str(tmp_path / f"{name.split('-')[1]}.jsonl"), b.read_row)
        bench |= {_masked(b.build(q, [])[0]) for q in qs}
    assert {_masked(c["conversations"][0]["value"]) for c in convs} == bench  # 2 MC + 3 VQA forms

    captions = {}
    for i in range(3):
        with tarfile.open(root / "data" / "shards" / f"{i:05d}.tar") as tf:
            captions |= {m.name[:-4]: tf.extractfile(m).read().decode() for m in tf if m.name.endswith(".txt")}
    for c in convs:
        (human, gpt), key = c["conversations"], os.path.basename(c["image"])[:-4]
        fg, shape, bg = re.fullmatch(r"a (\w+) (\w+) on a (\w+) background", captions[key]).groups()
        assert human["from"] == "human" and gpt["from"] == "gpt"
        if c["id"].startswith("vqa-"):
            question = re.search(r"Question: (.*?)\n", human["value"]).group(1)
            truth = {"What shape is in the image?": shape, "What colour is the shape?": fg,
                     "What colour is the background?": bg}
            assert gpt["value"] == truth[question]
        else:
            options = re.findall(r"\n[A-D]\. (\w+)", human["value"])
            assert len(options) == 4 and set(options) <= set(SHAPES) | set(COLOURS)
            assert options[ord(gpt["value"]) - ord("A")] == (shape if "shape is" in human["value"] else fg)


def test_plain_template_packs_the_eval_prompt_tokens_then_the_answer(demo):
    root, _, convs = demo
    tok = load_tokenizer(str(root / "data" / "tokenizer"))
    ids = special_ids(tok)
    builder = SampleBuilder(tok, image_tokens=4, sft_template="plain")
    for c in convs[:10]:
        prompt, answer = (t["value"] for t in c["conversations"])
        sample = builder.conversation(c["conversations"])
        want = encode(tok, prompt, 4, ids.image, ids.bos)  # what the evaluation feeds the model
        tail = tok(f" {answer}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(sample.input_ids, want + tail)
        np.testing.assert_array_equal(sample.loss_mask, [0] * len(want) + [1] * len(tail))
        assert sample.num_images == 1


def test_sft_from_a_missing_shard_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "oq2vl_jax.data.demo", "--sft-from", str(tmp_path / "{0..1}.tar"),
                          "--out", str(tmp_path / "qa")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == f"error: --sft-from: no such shard {tmp_path / '0.tar'}"


def _readme_commands(marker):
    """The `python -m oq2vl_jax.` lines of the README's bash block that contains `marker`."""
    with open(os.path.join(REPO, "README.md")) as f:
        block = next(b for b in re.findall(r"```bash\n(.*?)```", f.read(), re.S) if marker in b)
    cmds = re.split(r"\n|&&", block.replace("\\\n", " "))  # continuation lines joined first
    return [" ".join(c.split()) for c in cmds if c.strip().startswith("python -m oq2vl_jax.")]


@pytest.mark.slow
def test_readme_demo_sft_model_beats_chance_on_demo_vqa(tmp_path):
    """The README's quick start, then its demo SFT and evaluation block, as written (minutes on a CPU)."""
    import shutil

    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    job = _readme_commands("python -m oq2vl_jax.data.demo --out demo") + _readme_commands("tiny_sft.yaml")
    for cmd in job:
        out = subprocess.run(cmd.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stderr[-3000:])
    vqa = next(c for c in job if "--benchmark demo-vqa" in c and "--shots" not in c)
    with open(tmp_path / vqa.split("--out ")[1].split()[0] / "metrics.json") as f:
        metrics = json.load(f)
    # 64 questions whose answers are one of 4 shapes or 8 colours (chance 1/6): P(>= 20 right) < 0.2%.
    assert metrics["n"] == 64 and metrics["accuracy"] >= 20 / 64, metrics
