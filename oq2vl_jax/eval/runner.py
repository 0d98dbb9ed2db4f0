"""Runs a benchmark: prompts -> batched generation (or option likelihoods) -> predictions.jsonl -> metrics.

A run appends each finished batch to DIR/predictions.jsonl (predictions.p{i}.jsonl per process when
several hosts run, merged by process 0 at the end) and skips the ids already there, so a killed run
continues where it stopped. Metrics are always recomputed from the predictions file, as `score` does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL.Image import DecompressionBombError

from oq2vl_jax.cli import UserError
from oq2vl_jax.eval import predictions as P
from oq2vl_jax.eval.benchmarks import STOP_STRINGS, Benchmark
from oq2vl_jax.eval.data import Question, open_image
from oq2vl_jax.eval.fewshot import Demo
from oq2vl_jax.generate import Prompt, encode, load_image

log = logging.getLogger(__name__)


def stop_ids(tokenizer) -> list[int]:
    """Ids of the tokens ".", "," and "\\n" (the original's stop list, as far as it means anything in the
    Qwen vocabulary); a string that is not one token cannot stop generation and is skipped."""
    out = []
    for s in STOP_STRINGS:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) == 1:
            out.append(ids[0])
        else:
            log.warning("stop string %r is %d tokens in this tokenizer; it will not stop generation", s, len(ids))
    return out


def letter_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    ids = [tokenizer.encode(c, add_special_tokens=False) for c in letters]
    if any(len(i) != 1 for i in ids):
        raise UserError(f"option letters {list(letters)} are not one token each in this tokenizer")
    return [i[0] for i in ids]


class PromptMaker:
    """Renders, tokenizes and loads the images of questions; demonstration images are loaded once."""

    def __init__(self, bench: Benchmark, tokenizer, model_cfg, demos: Sequence[Demo] = ()):
        from oq2vl_jax.data.tokenizer import BOS

        self.bench, self.tok, self.cfg, self.demos = bench, tokenizer, model_cfg, list(demos)
        self.bos = tokenizer.convert_tokens_to_ids(BOS)
        self.size = model_cfg.vision.image_size
        self._demo_images = {id(d): load_image(open_image(d.image), self.size) for d in self.demos}

    def images(self, q: Question) -> tuple[str, np.ndarray | None]:
        """(prompt text, its images as [n, S, S, 3]); thread-safe (no tokenizer), so batches can be
        prepared on worker threads while the device runs the previous one."""
        text, images = self.bench.build(q, self.demos)
        # build() puts the demonstrations' images first (few-shot benchmarks only); they are loaded once.
        arrays = [self._demo_images[id(d)] for d in self.demos]
        arrays += [load_image(open_image(im), self.size) for im in images[len(self.demos):]]
        return text, np.stack(arrays) if arrays else None

    def prompt(self, text: str, images: np.ndarray | None) -> Prompt:
        return Prompt(encode(self.tok, text, self.cfg.image_tokens, self.cfg.image_token_id, self.bos), images)


def score_record(bench: Benchmark, q: Question, rec: dict) -> dict:
    """Per-question values; a question whose inputs could not be read scores 0 in every value (an empty
    output could otherwise be scored right, e.g. by MMMU's random fallback letter)."""
    if "error" not in rec:
        return bench.score(q, rec)
    blank = bench.score(q, {"output": "", "probs": [0.0] * max(1, len(bench.letters))})
    return {k: 0.0 if isinstance(v, float) else v for k, v in blank.items()}


def compute_metrics(bench: Benchmark, questions: Sequence[Question], records: dict[str, dict]) -> dict:
    """Metrics over the questions that have a record, with counts: n scored, errors, missing."""
    scored = [(q, records[q.id]) for q in questions if q.id in records]
    if not scored:
        raise UserError(f"no predictions for any of the {len(questions)} {bench.name} questions")
    scores = [score_record(bench, q, r) for q, r in scored]
    metrics = bench.metrics([q for q, _ in scored], scores)
    return {"benchmark": bench.name, "n": len(scored), "errors": sum("error" in r for _, r in scored),
            "missing": len(questions) - len(scored), **metrics}


def make_generator(model, tokenizer, mesh=None):
    """The generator evaluate() uses: the original's stop tokens, no vocabulary limit (HF generate's
    argmax runs over every embedding row too)."""
    from oq2vl_jax.data.tokenizer import PAD
    from oq2vl_jax.eval.parallel import DataParallelGenerator

    return DataParallelGenerator(model, mesh=mesh, pad_id=tokenizer.convert_tokens_to_ids(PAD),
                                 stop_ids=stop_ids(tokenizer))


def _share(questions: Sequence[Question], index: int, count: int) -> list[Question]:
    return [q for i, q in enumerate(questions) if i % count == index]


def evaluate(model, tokenizer, bench: Benchmark, questions: Sequence[Question], out_dir: str, *,
             demos: Sequence[Demo] = (), batch_size: int = 8, process_index: int = 0, process_count: int = 1,
             mesh=None, generator=None, progress: bool = True) -> dict:
    """Answers every question not yet in the predictions file, then writes and returns the metrics
    (process 0; other processes return {}). Pass a DataParallelGenerator (see make_generator) to reuse
    its compiled functions across calls."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "predictions.jsonl")
    path = final if process_count == 1 else os.path.join(out_dir, f"predictions.p{process_index}.jsonl")
    done = P.load(final) if process_count > 1 else {}
    done.update(P.load(path, repair=True))
    todo = [q for q in _share(questions, process_index, process_count) if q.id not in done]
    for q in todo:
        bench.validate(q)
    if done:
        log.info("%s: %d predictions already in %s; %d questions to go", bench.name, len(done), path, len(todo))

    gen = generator or make_generator(model, tokenizer, mesh)
    batch = -(-batch_size // gen.n_devices) * gen.n_devices  # rows split evenly over the devices
    options = letter_ids(tokenizer, bench.letters) if bench.likelihood else []
    maker = PromptMaker(bench, tokenizer, model.cfg, demos)
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    writer = P.Writer(path)
    pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
    submit = lambda chunk: [pool.submit(maker.images, q) for q in chunk]  # noqa: E731
    try:
        pending = submit(chunks[0]) if chunks else []
        for n, chunk in enumerate(tqdm(chunks, desc=bench.name, unit="batch", disable=not progress)):
            loaded, pending = pending, submit(chunks[n + 1]) if n + 1 < len(chunks) else []
            records, ok, prompts = [], [], []
            for q, fut in zip(chunk, loaded):
                try:
                    text, images = fut.result()
                except (OSError, ValueError, SyntaxError, DecompressionBombError) as e:  # unreadable: scores 0
                    log.warning("%s: question %s skipped: %s", bench.name, q.id, e)
                    records.append({"id": q.id, "output": "", "error": str(e)})
                    continue
                records.append({"id": q.id, "prompt": text})
                ok.append(records[-1])
                prompts.append(maker.prompt(text, images))
            if prompts:
                if bench.likelihood:
                    for r, p in zip(ok, gen.option_probs(prompts, options, batch)):
                        r["probs"] = p
                        r["output"] = bench.letters[int(np.argmax(p))]
                else:
                    outs = gen(prompts, max_new_tokens=bench.max_new_tokens, batch_size=batch)
                    for r, ids in zip(ok, outs):
                        r["output"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            by_id = {q.id: q for q in chunk}
            for r in records:
                r["score"] = score_record(bench, by_id[r["id"]], r)
            writer.write(records)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    log.info("%s: %s", bench.name, gen.stats.summary())

    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("oq2vl_eval_done")
        if process_index != 0:
            return {}
        _merge(out_dir, final, process_count)
    records = P.load(final)
    metrics = compute_metrics(bench, questions, records)
    with open(os.path.join(out_dir, "metrics.json.tmp"), "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(out_dir, "metrics.json.tmp"), os.path.join(out_dir, "metrics.json"))
    return metrics


def _merge(out_dir: str, final: str, count: int) -> None:
    """Appends every per-process record not yet in the final file, then removes the per-process files."""
    have = P.load(final, repair=True)
    writer = P.Writer(final)
    try:
        for i in range(count):
            part = os.path.join(out_dir, f"predictions.p{i}.jsonl")
            writer.write([r for k, r in P.load(part).items() if k not in have])
    finally:
        writer.close()
    for i in range(count):
        os.remove(os.path.join(out_dir, f"predictions.p{i}.jsonl"))


def table(metrics: dict) -> str:
    """The metrics as an aligned two-column table (fractions shown as percentages)."""
    rows = []
    for k, v in metrics.items():
        if isinstance(v, float):
            rows.append((k, f"{100 * v:.2f}"))
        else:
            rows.append((k, str(v)))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
