"""Few-shot in-context demonstrations, drawn as the original's index builders draw them.

K demonstrations are sampled once with `random.Random(seed).sample` (the original's seed is 21) from
the benchmark's train split and reused for every query; a demonstration's answer is the most common
annotator answer (VizWiz: the most common one other than "unanswerable", unless all are). They are
chained in front of the query as
    <image>\\nQuestion: {q}\\nAnswer the question using a single word or phrase.\\nAnswer: {a}<|endofchunk|>
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

from oq2vl_jax.eval.data import Question
from oq2vl_jax.generate import FEWSHOT_QUERY

SEED = 21  # the original's default seed for sampling demonstrations


@dataclasses.dataclass(frozen=True)
class Demo:
    question: str
    answer: str
    image: object  # path, bytes or PIL image


def demo_answer(q: Question, drop: str | None = None) -> str:
    """The answer a demonstration shows: its single answer, or the most common of its annotators'
    answers (ties: the first seen). `drop` is left out unless every answer is it."""
    if q.answers:
        answers = [a for a in q.answers if a != drop] or list(q.answers)
        return Counter(answers).most_common(1)[0][0]
    if q.answer is None:
        raise ValueError(f"train question {q.id!r} has no answer to demonstrate")
    return q.answer


def draw_demos(train: Sequence[Question], k: int, seed: int = SEED, drop: str | None = None) -> list[Demo]:
    """k demonstrations sampled without replacement from `train`, the same for every call."""
    if k > len(train):
        raise ValueError(f"--shots {k} but the train split has only {len(train)} questions")
    demos = []
    for q in random.Random(seed).sample(list(train), k):
        if len(q.images) != 1:
            raise ValueError(f"train question {q.id!r} has {len(q.images)} images; a demonstration has one")
        demos.append(Demo(q.question, demo_answer(q, drop), q.images[0]))
    return demos


def chain(demos: Sequence[Demo], question: str, preamble: str = "", n_images: int = 1) -> str:
    """The prompt text: preamble, each demonstration with its answer, then the query. The query's
    template holds one image; other counts put that many tags in its place."""
    text = preamble + "".join(FEWSHOT_QUERY.format(q=d.question) + f" {d.answer}<|endofchunk|>" for d in demos)
    query = FEWSHOT_QUERY.format(q=question)
    if n_images != 1:
        query = "<image>\n" * n_images + query.removeprefix("<image>\n")
    return text + query
