"""`python -m oq2vl_jax.eval` end to end on a tiny random checkpoint: jsonl files of each schema and
parquet files in the HF-datasets layouts; `score` reproduces `run`'s metrics; a killed run resumes."""

import dataclasses
import io
import json
import os

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import Mesh
from PIL import Image

from hf_tiny import our_config
from oq2vl_jax import checkpoint
from oq2vl_jax.config import Config
from oq2vl_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer, special_ids
from oq2vl_jax.eval import benchmarks as B
from oq2vl_jax.eval import predictions as P
from oq2vl_jax.eval import runner
from oq2vl_jax.eval.__main__ import main
from oq2vl_jax.eval import scoring as S
from oq2vl_jax.eval.data import DataError, Question, read_questions
from oq2vl_jax.eval.fewshot import Demo, draw_demos
from oq2vl_jax.models import build, flat_params

TEXTS = ["Question: what colour is the shape?", "Answer the question using a single word or phrase.",
         "Answer with the option's letter from the given choices directly.", "A. red\nB. blue", "yes, no.",
         "Is there a dog in the image?", "red green blue circle square"] * 20


def _png(seed, size=(30, 40)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny random model with its tokenizer, and benchmark files of each kind (no checkpoint: see ckpt)."""
    root = tmp_path_factory.mktemp("eval")
    build_tiny_tokenizer(TEXTS, str(root / "run" / "tok"), vocab_size=300)
    tok = load_tokenizer(str(root / "run" / "tok"))
    cfg = our_config(image_tokens=4)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(tok)),
                              image_token_id=special_ids(tok).image)
    model = build(cfg, seed=3)

    data = root / "data"
    (data / "img").mkdir(parents=True)
    for i in range(12):
        (data / "img" / f"{i}.png").write_bytes(_png(i))
    colours = ["red", "green", "blue"]

    def jsonl(name, recs):
        with open(data / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        return str(data / name)

    files = {
        "mc": jsonl("mc.jsonl", [{"id": f"m{i}", "image": f"img/{i}.png", "question": "What colour is the shape?",
                                  "options": colours, "answer": "ABC"[i % 3]} for i in range(5)]),
        "open": jsonl("open.jsonl", [{"id": f"o{i}", "image": f"img/{i}.png", "question": "What colour?",
                                      "answers": [colours[i % 3]] * 10} for i in range(5)]),
        "train": jsonl("train.jsonl", [{"id": f"t{i}", "image": f"img/{6 + i}.png", "question": "What colour?",
                                        "answers": [colours[i % 3]] * 7 + ["x"] * 3} for i in range(6)]),
        "yesno": jsonl("yesno.jsonl", [{"id": f"y{i}", "image": f"img/{i}.png", "question": "Is there a dog?",
                                        "answer": ["yes", "no"][i % 2], "category": ["random", "popular"][i % 2]}
                                       for i in range(5)]),
    }
    pq.write_table(pa.table({
        "question": ["Which colour?"] * 3, "options": [colours, colours[:2], colours],
        "answer": ["0", "1", "2"], "image": [{"bytes": _png(20 + i), "path": None} for i in range(3)]}),
        data / "ai2d.parquet")
    files["ai2d"] = str(data / "ai2d.parquet")
    return {"root": root, "model": model, "tok": tok, **files}


@pytest.fixture(scope="module")
def ckpt(env):
    """env plus its model saved as a run directory (config.yaml with a relative tokenizer path, Orbax params)."""
    run = env["root"] / "run"
    checkpoint.save_config(str(run), Config(model=env["model"].cfg, tokenizer="tok"))
    mngr = checkpoint.make_manager(str(run), async_save=False)
    checkpoint.save(mngr, 1, params=checkpoint.nest(checkpoint.to_numpy(flat_params(env["model"]))))
    mngr.wait_until_finished()
    mngr.close()
    return {**env, "run": str(run)}


def _run(tmp_path, env, bench, data, *extra):
    out = str(tmp_path / bench)
    assert main(["--log-level", "WARNING", "run", "--checkpoint", env["run"], "--benchmark", bench, "--data", data,
                 "--out", out, *extra]) == 0
    return out


@pytest.mark.slow  # ~15 s of compiling on 8 devices each; the default suite runs evaluate() below
@pytest.mark.parametrize("bench,kind,extra", [
    ("mmbench", "mc", ()), ("pope", "yesno", ()), ("vqav2", "open", ("--shots", "2")), ("ai2d", "ai2d", ())])
def test_run_writes_every_question_and_score_reproduces_the_metrics(tmp_path, ckpt, capsys, bench, kind, extra):
    env = ckpt
    if extra:
        extra = (*extra, "--train", env["train"])
    out = _run(tmp_path, env, bench, env[kind], *extra)
    questions, _ = read_questions(env[kind], B.get(bench).read_row)
    recs = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    assert sorted(r["id"] for r in recs) == sorted(q.id for q in questions)
    assert all({"id", "output", "prompt", "score"} <= set(r) for r in recs)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["n"] == len(questions) and metrics["missing"] == 0 and metrics["errors"] == 0
    if bench == "vqav2":  # two demonstrations chained before every query, the same ones each time
        assert all(r["prompt"].count("<|endofchunk|>") == 2 and r["prompt"].count("<image>") == 3 for r in recs)
        assert len({r["prompt"].rsplit("<|endofchunk|>", 1)[0] for r in recs}) == 1
    if bench == "ai2d":
        assert all(len(r["probs"]) == 4 and abs(sum(r["probs"]) - 1) < 1e-6 for r in recs)
    if bench == "pope":
        assert {"random/accuracy", "popular/f1", "precision", "recall"} <= set(metrics)
    capsys.readouterr()
    assert main(["score", "--benchmark", bench, "--data", env[kind],
                 "--predictions", os.path.join(out, "predictions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    # the same --out with another evaluation is refused rather than mixed in
    assert main(["run", "--checkpoint", env["run"], "--benchmark", "seedbench", "--data", env["mc"], "--out", out]) == 2
    assert f"different evaluation (benchmark: '{bench}'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gen1(env):
    """One single-device generator for several evaluate() calls: it compiles once."""
    return runner.make_generator(env["model"], env["tok"], Mesh(np.array(jax.devices()[:1]), ("data",)))


def _twenty(env):
    bench = B.get("vqav2")
    questions, _ = read_questions(env["open"], bench.read_row)
    return bench, [dataclasses.replace(q, id=f"{q.id}-{k}") for k in range(4) for q in questions]


def test_a_killed_run_resumes_without_redoing_or_losing_questions(tmp_path, env, gen1, monkeypatch):
    bench, questions = _twenty(env)
    model, tok = env["model"], env["tok"]
    kw = dict(batch_size=8, progress=False, generator=gen1)
    full = runner.evaluate(model, tok, bench, questions, str(tmp_path / "full"), **kw)

    calls, real_write = [], P.Writer.write

    def dying_write(self, records):
        calls.append([r["id"] for r in records])
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second batch was being written
        real_write(self, records)

    monkeypatch.setattr(P.Writer, "write", dying_write)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(model, tok, bench, questions, out, **kw)
    monkeypatch.setattr(P.Writer, "write", real_write)
    path = os.path.join(out, "predictions.jsonl")
    with open(path, "a") as f:
        f.write('{"id": "o1-3", "outp')  # and a line cut off mid-write
    assert len(P.load(path)) == 8

    generated = []
    real_images = runner.PromptMaker.images
    monkeypatch.setattr(runner.PromptMaker, "images", lambda self, q: generated.append(q.id) or real_images(self, q))
    resumed = runner.evaluate(model, tok, bench, questions, out, **kw)
    assert sorted(generated) == sorted(q.id for q in questions[8:])  # only what was not written
    lines = open(path).read().splitlines()
    assert len(lines) == 20 and len({json.loads(x)["id"] for x in lines}) == 20
    want = {r["id"]: r["output"] for r in P.load(os.path.join(tmp_path / "full", "predictions.jsonl")).values()}
    assert {r["id"]: r["output"] for r in P.load(path).values()} == want
    assert resumed == full


def test_processes_answer_their_share_and_process_0_merges_all(tmp_path, env, gen1):
    bench, questions = _twenty(env)
    questions[3] = dataclasses.replace(questions[3], images=[str(tmp_path / "missing.png")])  # unreadable
    kw = dict(batch_size=8, progress=False, generator=gen1, process_count=2)
    out = str(tmp_path / "mh")
    assert runner.evaluate(env["model"], env["tok"], bench, questions, out, process_index=1, **kw) == {}
    assert sorted(P.load(os.path.join(out, "predictions.p1.jsonl"))) == sorted(q.id for q in questions[1::2])
    metrics = runner.evaluate(env["model"], env["tok"], bench, questions, out, process_index=0, **kw)
    assert sorted(os.listdir(out)) == ["metrics.json", "predictions.jsonl"]
    assert sorted(P.load(os.path.join(out, "predictions.jsonl"))) == sorted(q.id for q in questions)
    assert metrics["n"] == 20 and metrics["missing"] == 0 and metrics["errors"] == 1
    bad = P.load(os.path.join(out, "predictions.jsonl"))[questions[3].id]
    assert "missing.png" in bad["error"] and bad["score"] == {"accuracy": 0.0}


def test_a_question_that_could_not_be_read_scores_zero_whatever_the_rule():
    mc = Question("1", "q", [], ["x", "y"], "A")
    picks = {S.parse_multi_choice("", {"A": "x", "B": "y"}, seed=str(i)) for i in range(20)}
    assert picks == {"A", "B"}  # an empty output would be scored right about half the time...
    for name in ("mmmu", "mmbench", "ai2d"):  # ...so an unreadable question is zeroed instead
        assert set(runner.score_record(B.get(name), mc, {"id": "1", "output": "", "error": "x"}).values()) == {0.0}


def test_demo_benchmark_files_are_valid_questions_with_one_right_option(tmp_path):
    from oq2vl_jax.eval.demo import write_demo_benchmark

    assert write_demo_benchmark(str(tmp_path), num=12, seed=3) == {"mc": 12, "vqa": 12, "train": 16}
    mc, _ = read_questions(str(tmp_path / "mc.jsonl"), B.get("demo-mc").read_row)
    vqa, _ = read_questions(str(tmp_path / "vqa.jsonl"), B.get("demo-vqa").read_row)
    train, _ = read_questions(str(tmp_path / "vqa_train.jsonl"), B.get("demo-vqa").read_row)
    for q in mc:
        B.get("demo-mc").validate(q)
        assert len(q.options) == 4 == len(set(q.options)) and os.path.exists(q.images[0])
    assert {q.question for q in vqa} == {"What shape is in the image?", "What colour is the shape?",
                                         "What colour is the background?"}
    assert len({q.images[0] for q in vqa + train}) == 28  # the train images are other images
    # the right option names what was drawn: the VQA question on the same image agrees
    shape = {q.images[0]: q.answers[0] for q in vqa if "shape?" in q.question}
    for q in mc:
        if "shape?" in q.question and q.images[0] in shape:
            assert q.options["ABCD".index(q.answer)] == shape[q.images[0]]


def test_a_cut_off_last_prediction_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "output": "x"}\n{"id": "b", "output": "y"}')  # complete, no newline
    assert sorted(P.load(str(path), repair=True)) == ["a", "b"] and path.read_text().endswith("}\n")
    path.write_text('{"id": "a", "output": "x"}\n{"id": "b", "outp')
    assert sorted(P.load(str(path), repair=True)) == ["a"] and path.read_text() == '{"id": "a", "output": "x"}\n'
    path.write_text('{"id": "a", "outp\n{"id": "b", "output": "y"}\n')
    with pytest.raises(DataError, match="p.jsonl:1: not a prediction record"):
        P.load(str(path))


@pytest.mark.slow
def test_a_larger_limit_extends_the_same_run(tmp_path, ckpt):
    env = ckpt
    out = _run(tmp_path, env, "pope", env["yesno"], "--limit", "2")
    assert len(P.load(os.path.join(out, "predictions.jsonl"))) == 2
    _run(tmp_path, env, "pope", env["yesno"])
    assert len(P.load(os.path.join(out, "predictions.jsonl"))) == 5


def test_demonstrations_are_drawn_once_with_the_seed_and_show_the_majority_answer(env):
    train, _ = read_questions(env["train"], B.get("vqav2").read_row)
    a, b = draw_demos(train, 3, seed=21), draw_demos(train, 3, seed=21)
    assert a == b and len({d.image for d in a}) == 3 and draw_demos(train, 3, seed=5) != a
    assert all(d.answer in ("red", "green", "blue") for d in a)  # 7 of 10 annotators, not the "x"s
    vizwiz = [dataclasses.replace(train[0], answers=["unanswerable"] * 6 + ["cup"] * 4)]
    assert draw_demos(vizwiz, 1, drop="unanswerable")[0].answer == "cup"
    text, images = B.get("gqa").build(train[1], [Demo("Q1?", "a1", "i1.png")])
    assert text == (B.GQA_PREAMBLE + "<image>\nQuestion: Q1?\nAnswer the question using a single word or phrase."
                    "\nAnswer: a1<|endofchunk|><image>\nQuestion: What colour?\nAnswer the question using a single "
                    "word or phrase.\nAnswer:") and images == ["i1.png", train[1].images[0]]
    assert B.get("gqa").build(train[1], [])[0].startswith("<image>\nQuestion: What colour?")  # no preamble 0-shot


def _parquet(path, cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


def test_parquet_layouts_become_the_benchmarks_questions_and_prompts(tmp_path):
    img = {"bytes": _png(1), "path": None}
    f = _parquet(tmp_path / "mmbench.parquet", {
        "index": [7], "question": ["Which?"], "hint": [None], "A": ["cat"], "B": ["dog"], "C": ["fox"], "D": [None],
        "answer": ["B"], "category": ["x"], "image": [img]})
    (q,), _ = read_questions(f, B.get("mmbench").read_row)
    assert (q.id, q.options, q.answer) == ("7", ["cat", "dog", "fox"], "B")
    assert B.get("mmbench").build(q, [])[0] == ("<image>\nWhich?\nA. cat\nB. dog\nC. fox\nAnswer with the "
                                                "option's letter from the given choices directly.\nAnswer:")
    f = _parquet(tmp_path / "seed.parquet", {
        "question_id": ["1", "2"], "question": ["Q?", "V?"], "choice_a": ["a"] * 2, "choice_b": ["b"] * 2,
        "choice_c": ["c"] * 2, "choice_d": ["d"] * 2, "answer": ["D", "A"], "data_type": ["image", "video"],
        "image": [[img], [img, img]]})
    qs, left_out = read_questions(f, B.get("seedbench").read_row)
    assert [q.id for q in qs] == ["1"] and left_out == 1 and qs[0].options == ["a", "b", "c", "d"]
    f = _parquet(tmp_path / "mmstar.parquet", {"index": [0], "question": ["Q?\nOptions: A: x, B: y"],
                                               "answer": ["A"], "category": ["c"], "image": [_png(2)]})
    (q,), _ = read_questions(f, B.get("mmstar").read_row)
    assert B.get("mmstar").build(q, [])[0] == ("<image>\nQuestion: Q?\nOptions: A: x, B: y\nAnswer with the "
                                               "option's letter from the given choices directly.\nAnswer:")
    f = _parquet(tmp_path / "mmmu.parquet", {
        "id": ["v_1", "v_2"], "question": ["See <image 1> and <image 2>.", "How many?"],
        "options": ["['1', '2']", "[]"], "answer": ["A", "3"], "question_type": ["multiple-choice", "open"],
        "subfield": ["Clinical_Medicine", "Math"], "image_1": [img, img], "image_2": [None, None]})
    (mc, op), _ = read_questions(f, B.get("mmmu").read_row)
    text, images = B.get("mmmu").build(mc, [])
    assert text == ("The following are multiple choice questions about  Clinical Medicine.\n\nSee <image>\n and "
                    "<image>\n.\nA. 1\nB. 2\nAnswer with the option's letter from the given choices directly.\nAnswer:")
    assert len(images) == 2  # one image, cycled to fill both placeholders
    assert (op.options, op.answer) == (None, "3") and B.get("mmmu").build(op, [])[1] == []
    f = _parquet(tmp_path / "mathvista.parquet", {
        "pid": ["1", "2"], "question": ["Which?", "Sum?"], "choices": [["3", "4"], None], "answer": ["4", "7"],
        "question_type": ["multi_choice", "free_form"], "decoded_image": [img, img], "image": ["a.png", "b.png"]})
    (mc, op), _ = read_questions(f, B.get("mathvista").read_row)
    assert (mc.options, mc.answer, op.answer) == (["3", "4"], "B", "7")
    f = _parquet(tmp_path / "vqav2.parquet", {
        "question_id": [5], "question": ["Color?"], "image": [img],
        "answers": [[{"answer": "red", "answer_confidence": "yes", "answer_id": 1}] * 10]})
    (q,), _ = read_questions(f, B.get("vqav2").read_row)
    assert q.answers == ["red"] * 10
    f = _parquet(tmp_path / "pope.parquet", {"question_id": ["3"], "question": ["Is there a cat?"],
                                             "answer": ["Yes"], "image": [img], "category": ["adversarial"]})
    (q,), _ = read_questions(f, B.get("pope").read_row)
    assert (q.answer, q.meta["category"]) == ("yes", "adversarial")
    gqa = tmp_path / "gqa"
    gqa.mkdir()
    _parquet(gqa / "testdev_balanced_images.parquet",
             {"id": ["n1", "n2"], "image": [img, {"bytes": _png(9), "path": None}]})
    _parquet(gqa / "testdev_balanced_instructions.parquet", {
        "id": ["q1", "q2"], "imageId": ["n2", "n1"], "question": ["Color?", "Side?"], "answer": ["red", "left"]})
    qs, _ = read_questions(str(gqa), B.get("gqa").read_row)
    assert [(q.id, q.answer, q.images[0]["bytes"]) for q in qs] == [("q1", "red", _png(9)), ("q2", "left", _png(1))]
    with pytest.raises(DataError, match="row 0: not in the expected layout"):
        read_questions(f, B.get("mmbench").read_row)


def test_bad_inputs_fail_with_one_named_line(tmp_path, env, capsys):
    """All refused before any model is loaded (the checkpoint path is never opened)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q", "image": "x.png", "options": ["a"]}\n')
    assert main(["score", "--benchmark", "mmbench", "--data", str(bad), "--predictions", str(bad)]) == 2
    assert "bad.jsonl:1: a multiple-choice line has 'options'" in capsys.readouterr().err
    assert main(["score", "--benchmark", "mmbench", "--data", str(tmp_path / "nope.jsonl"),
                 "--predictions", str(bad)]) == 2
    assert "benchmark data not found" in capsys.readouterr().err
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "zzz", "output": "A"}\n')
    assert main(["score", "--benchmark", "mmbench", "--data", env["mc"], "--predictions", str(preds)]) == 2
    assert "no predictions for any of the 5 mmbench questions" in capsys.readouterr().err
    assert main(["run", "--checkpoint", "no/such/run", "--benchmark", "mmbench", "--data", env["mc"], "--shots", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "zero-shot in the original" in capsys.readouterr().err
    assert main(["run", "--checkpoint", "no/such/run", "--benchmark", "vqav2", "--data", env["open"], "--shots", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--shots needs --train" in capsys.readouterr().err
    assert main(["run", "--checkpoint", "no/such/run", "--benchmark", "vqav2", "--data", env["open"], "--shots", "9",
                 "--train", env["train"], "--out", str(tmp_path / "o")]) == 2
    assert "--shots 9 but the train split has only 6 questions" in capsys.readouterr().err
