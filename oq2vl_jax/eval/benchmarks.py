"""The benchmark registry: per benchmark its parquet reader, prompt, decoding protocol and scorer.

Prompts, decoding (greedy, 16 new tokens, stop after ".", "," or "\\n") and scoring follow the original's
harness (docs/eval.md lists each protocol and where we differ). Scores are fractions in [0, 1].
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence

from oq2vl_jax.eval import scoring as S
from oq2vl_jax.eval.data import DataError, Question
from oq2vl_jax.eval.fewshot import Demo, chain

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_TRIGGER = "\nAnswer with the option's letter from the given choices directly.\nAnswer:"
OPEN_TRIGGER = "\nAnswer the question using a single word or phrase.\nAnswer:"
STOP_STRINGS = (".", ",", "\n")  # the original stops on these tokens (and on none of the special ones)
GQA_PREAMBLE = (
    "You are tasked with answering open-ended questions based on images provided from the visual question "
    "answering dataset. Each question may require understanding the visual content of the image, interpreting "
    "natural language, and applying commonsense knowledge. Your goal is to generate the most accurate answer "
    "based on the image, considering multiple possible interpretations.\n\n")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # question kind the scorer needs: "mc", "vqa", "yesno", "mixed" (MC or open)
    read_row: Callable[[dict, int], Question | None]  # a parquet row -> Question (None: not evaluated)
    build: Callable[[Question, Sequence[Demo]], tuple[str, list]]  # -> (prompt text, images in order)
    score: Callable[[Question, dict], dict]  # (question, prediction record) -> per-question values
    columns: str  # the parquet columns read_row uses (README)
    aggregate: Callable[[Sequence[Question], Sequence[dict]], dict] | None = None  # default: means
    likelihood: bool = False  # score option letters from one forward pass instead of generating
    letters: tuple[str, ...] = ()
    fewshot: bool = False
    demo_drop: str | None = None
    max_new_tokens: int = 16
    main: str = "accuracy"

    def validate(self, q: Question) -> None:
        ok = {"mc": q.options is not None or (self.name == "mmstar" and q.answer is not None),
              "vqa": bool(q.answers) or q.answer is not None,
              "yesno": q.answer in ("yes", "no"),
              "mixed": q.answer is not None or bool(q.answers)}[self.kind]
        if not ok:
            need = {"mc": "'options' and a letter 'answer'", "vqa": "'answers' (or 'answer')",
                    "yesno": "'answer' yes or no", "mixed": "'answer' or 'answers'"}[self.kind]
            raise DataError(f"{self.name}: question {q.id!r} lacks {need}")
        if q.options is not None and q.answer not in LETTERS[:len(q.options)] and self.kind != "vqa":
            raise DataError(f"{self.name}: question {q.id!r}: answer {q.answer!r} is not one of the option "
                            f"letters {LETTERS[:len(q.options)]}")

    def metrics(self, questions: Sequence[Question], scores: Sequence[dict]) -> dict:
        if self.aggregate is not None:
            return self.aggregate(questions, scores)
        keys = scores[0].keys() if scores else ()
        return {k: sum(s[k] for s in scores) / len(scores) for k in keys}


# --- prompts ---

def _tags(n: int) -> str:
    return "<image>\n" * n


def _options(options: Sequence[str]) -> str:
    return "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))


def build_mc(q: Question, demos) -> tuple[str, list]:
    """MMBench, SEED-Bench, AI2D: question, "A. ..." lines, the letter trigger."""
    return _tags(len(q.images)) + q.question + _options(q.options) + MC_TRIGGER, list(q.images)


def build_mmstar(q: Question, demos) -> tuple[str, list]:
    """MMStar's questions carry their options ("Options: A: ..., B: ..."); jsonl options are added so."""
    text = q.question
    if q.options:
        text += "\nOptions: " + ", ".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(q.options))
    return _tags(len(q.images)) + f"Question: {text}" + MC_TRIGGER, list(q.images)


def build_vqa(preamble: str = "") -> Callable:
    """Short-answer VQA: demonstrations (each with its image) then the query; the preamble only with demos."""
    def build(q: Question, demos) -> tuple[str, list]:
        text = chain(demos, q.question, preamble if demos else "", n_images=len(q.images))
        return text, [d.image for d in demos] + list(q.images)
    return build


def build_mmmu(q: Question, demos) -> tuple[str, list]:
    """MMMU: subject line, question, options; "<image N>" placeholders become "<image>\\n". As the
    original, images are cycled when there are more placeholders than images; extra images are dropped."""
    subject = " " + " ".join(str(q.meta.get("subfield", "")).split("_"))  # format_subject's leading space
    text = f"The following are multiple choice questions about {subject}.\n\n" + q.question
    text += (_options(q.options) + MC_TRIGGER) if q.options else OPEN_TRIGGER
    text = re.sub(r"<image\s*\d+>", "<image>\n", text)
    n = text.count("<image>")
    images = [q.images[i % len(q.images)] for i in range(n)] if q.images else []
    if n and not images:
        raise DataError(f"mmmu: question {q.id!r} has {n} image placeholders and no image")
    return text, images


def build_mathvista(q: Question, demos) -> tuple[str, list]:
    text = _tags(len(q.images)) + q.question
    text += (_options(q.options) + MC_TRIGGER) if q.options else OPEN_TRIGGER
    return text, list(q.images)


# --- scorers ---

def score_mc(case_sensitive: bool) -> Callable:
    def score(q: Question, p: dict) -> dict:
        out = p["output"]
        return {"accuracy": S.mc_substring(out, q.answer, case_sensitive), "strict": S.mc_strict(out, q.answer)}
    return score


def score_likelihood(q: Question, p: dict) -> dict:
    probs = p["probs"]
    return {"accuracy": float(LETTERS[max(range(len(probs)), key=lambda i: (probs[i], -i))] == q.answer)}


def _vqa_answers(q: Question) -> list[str]:
    return q.answers if q.answers else [q.answer]


def score_vqa(q: Question, p: dict) -> dict:
    return {"accuracy": S.vqa_accuracy(S.vqa_output(p["output"]), _vqa_answers(q))}


def score_gqa(q: Question, p: dict) -> dict:
    gold, out = _vqa_answers(q)[0], S.vqa_output(p["output"])
    return {"accuracy": S.vqa_exact_match(out, gold),
            "accuracy_original": float(S.strip_punctuation_lower(out) == gold)}


def score_yesno(q: Question, p: dict) -> dict:
    return {"accuracy": float(S.yes_no(p["output"]) == q.answer)}


def aggregate_pope(questions, scores) -> dict:
    """Per category (adversarial / popular / random, or "all"): accuracy, precision, recall, F1; the final
    accuracy and F1 are means over categories, as the original reports them."""
    by_cat = defaultdict(lambda: ([], []))
    for q, s in zip(questions, scores):
        preds, labels = by_cat[str(q.meta.get("category", "all"))]
        preds.append(s["parsed"])
        labels.append(q.answer)
    out = {}
    for cat in sorted(by_cat):
        for k, v in S.binary_metrics(*by_cat[cat]).items():
            out[f"{cat}/{k}"] = v
    for k in ("accuracy", "f1", "precision", "recall"):
        out[k] = sum(out[f"{c}/{k}"] for c in by_cat) / len(by_cat)
    return out


def score_pope(q: Question, p: dict) -> dict:
    parsed = S.yes_no(p["output"])
    return {"accuracy": float(parsed == q.answer), "parsed": parsed}


def score_mixed(q: Question, p: dict) -> dict:
    """MMMU / MathVista: rule-based letter parsing for multiple choice, answer matching for open ones."""
    if q.options:
        index2ans = {LETTERS[i]: o for i, o in enumerate(q.options)}
        return {"accuracy": float(S.parse_multi_choice(p["output"], index2ans, seed=q.id) == q.answer)}
    gold = q.answers if q.answers else q.answer
    return {"accuracy": S.eval_open(gold, S.parse_open(p["output"]))}


# --- parquet readers (the lmms-lab / official HF-datasets layouts) ---

def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _image_list(v) -> list:
    return [x for x in v if not _missing(x)] if isinstance(v, list) else [v]


def read_mmbench(row, i):
    opts = [str(row[L]) for L in "ABCD" if L in row and not _missing(row[L])]
    return Question(str(row["index"]), row["question"], [row["image"]], opts, str(row["answer"]),
                    meta={"category": row.get("category")})


def read_seedbench(row, i):
    if row.get("data_type", "image") != "image":
        return None
    opts = [str(row[f"choice_{c}"]) for c in "abcd"]
    return Question(str(row["question_id"]), row["question"], _image_list(row["image"]), opts, str(row["answer"]),
                    meta={"category": row.get("question_type_id")})


def read_mmstar(row, i):
    return Question(str(row["index"]), row["question"], [row["image"]], None, str(row["answer"]),
                    meta={"category": row.get("category")})


def read_ai2d(row, i):
    opts = [str(o) for o in row["options"]]
    return Question(str(row.get("id", i)), row["question"], [row["image"]], opts, LETTERS[int(row["answer"])])


def read_pope(row, i):
    return Question(str(row["question_id"]), row["question"], [row["image"]], answer=str(row["answer"]).lower(),
                    meta={"category": row.get("category", "all")})


def read_mmmu(row, i):
    images = [row[f"image_{k}"] for k in range(1, 6) if not _missing(row.get(f"image_{k}"))]
    meta = {"subfield": row.get("subfield", ""), "question_type": row.get("question_type")}
    if row.get("question_type") == "multiple-choice":
        opts = row["options"]
        opts = ast.literal_eval(opts) if isinstance(opts, str) else list(opts)
        return Question(str(row["id"]), row["question"], images, [str(o) for o in opts], str(row["answer"]), meta=meta)
    return Question(str(row["id"]), row["question"], images, answer=str(row["answer"]), meta=meta)


def read_mathvista(row, i):
    image = row.get("decoded_image") or row["image"]
    if row.get("question_type") == "multi_choice":
        choices = [str(c) for c in row["choices"]]
        return Question(str(row["pid"]), row["question"], [image], choices, LETTERS[choices.index(str(row["answer"]))])
    return Question(str(row["pid"]), row["question"], [image], answer=str(row["answer"]))


def read_vqa(row, i):
    answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row["answers"]]
    return Question(str(row["question_id"]), row["question"], [row["image"]], answers=answers)


def read_gqa(row, i):
    return Question(str(row.get("id", row.get("question_id", i))), row["question"], [row["image"]],
                    answer=str(row["answer"]))


_MC_COLS = "question, image, answer (letter)"
_VQA_COLS = "question_id, question, image, answers (list of strings or of {answer: ...})"

REGISTRY: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("mmbench", "mc", read_mmbench, build_mc, score_mc(False), f"index, {_MC_COLS}, A, B, C, D"),
    Benchmark("seedbench", "mc", read_seedbench, build_mc, score_mc(False),
              "question_id, question, choice_a..choice_d, answer (letter), image (or list), data_type"),
    Benchmark("mmstar", "mc", read_mmstar, build_mmstar, score_mc(True),
              f"index, {_MC_COLS} (options inside the question)"),
    Benchmark("ai2d", "mc", read_ai2d, build_mc, score_likelihood,
              "question, options (list), answer (option index), image", likelihood=True, letters=tuple("ABCD")),
    Benchmark("pope", "yesno", read_pope, build_vqa(), score_pope,
              "question_id, question, answer (yes/no), image, category", aggregate=aggregate_pope),
    Benchmark("mmmu", "mixed", read_mmmu, build_mmmu, score_mixed,
              "id, question, options (list or its string), answer, question_type, subfield, image_1..image_5"),
    Benchmark("mathvista", "mixed", read_mathvista, build_mathvista, score_mixed,
              "pid, question, choices, answer, question_type, decoded_image (or image)"),
    Benchmark("textvqa", "vqa", read_vqa, build_vqa(), score_vqa, _VQA_COLS, fewshot=True),
    Benchmark("vqav2", "vqa", read_vqa, build_vqa(), score_vqa, _VQA_COLS, fewshot=True),
    Benchmark("okvqa", "vqa", read_vqa, build_vqa(), score_vqa, _VQA_COLS, fewshot=True),
    Benchmark("vizwiz", "vqa", read_vqa, build_vqa(), score_vqa, _VQA_COLS, fewshot=True, demo_drop="unanswerable"),
    Benchmark("gqa", "vqa", read_gqa, build_vqa(GQA_PREAMBLE), score_gqa,
              "id, question, answer, image (images joined in)", fewshot=True),
    # Built from the demo data (python -m oq2vl_jax.eval.demo): jsonl only.
    Benchmark("demo-mc", "mc", read_mmbench, build_mc, score_mc(False), "(jsonl only)"),
    Benchmark("demo-vqa", "vqa", read_vqa, build_vqa(), score_vqa, "(jsonl only)", fewshot=True),
]}


def get(name: str) -> Benchmark:
    if name not in REGISTRY:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]
