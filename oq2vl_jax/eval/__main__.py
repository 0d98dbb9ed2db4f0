"""Evaluates a checkpoint on a benchmark with the original's protocol, or re-scores a predictions file.

    python -m oq2vl_jax.eval run --checkpoint RUN --benchmark NAME --data PATH [--shots K --train PATH]
                                 [--limit N] --out DIR
    python -m oq2vl_jax.eval score --benchmark NAME --data PATH --predictions DIR/predictions.jsonl

`run` writes DIR/predictions.jsonl (id, output, prompt, per-question score), DIR/metrics.json and prints
a table; run it again with the same arguments to continue a killed run. `score` needs no model and
prints the metrics JSON as its last line. PATH is a parquet file or folder (HF-datasets layout, images
embedded) or a uniform jsonl file; benchmarks: see oq2vl_jax.eval.benchmarks.REGISTRY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from oq2vl_jax import cli
from oq2vl_jax.cli import UserError


def _common(p: argparse.ArgumentParser) -> None:
    from oq2vl_jax.eval.benchmarks import REGISTRY

    p.add_argument("--benchmark", required=True, choices=sorted(REGISTRY))
    p.add_argument("--data", required=True, help="parquet file/folder or uniform jsonl of the evaluated split")
    p.add_argument("--limit", type=int, help="only the first N questions (in file order)")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m oq2vl_jax.eval", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="generate predictions and score them")
    r.add_argument("--checkpoint", required=True, help="run or converted-checkpoint directory")
    r.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    _common(r)
    r.add_argument("--shots", type=int, default=0, help="few-shot demonstrations (VQA benchmarks; needs --train)")
    r.add_argument("--train", help="train split (same formats as --data) the demonstrations are drawn from")
    r.add_argument("--seed", type=int, default=21, help="seed for drawing demonstrations (the original's: 21)")
    r.add_argument("--batch-size", type=int, default=8, help="rows per batch, rounded up to a multiple of the devices")
    cli.add_out(r)
    cli.add_tokenizer(r)
    cli.add_dtype(r)
    s = sub.add_parser("score", help="re-score a predictions file without a model")
    _common(s)
    s.add_argument("--predictions", required=True, help="predictions.jsonl written by `run`")
    return p


def _questions(args):
    from oq2vl_jax.eval import benchmarks
    from oq2vl_jax.eval.data import read_questions

    bench = benchmarks.get(args.benchmark)
    questions, filtered = read_questions(args.data, bench.read_row)
    if filtered:
        print(f"{args.data}: {filtered} rows are not part of {bench.name}'s evaluation (left out)", file=sys.stderr)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError(f"--limit must be >= 1, got {args.limit}")
        questions = questions[:args.limit]
    return bench, questions


def _check_same_run(out: str, settings: dict, write: bool) -> None:
    """A resumed run must be the same evaluation, or its predictions would mix with the new ones."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for k, v in settings.items():
            if k != "limit" and old.get(k) != v:
                raise UserError(f"{out} holds predictions of a different evaluation ({k}: {old.get(k)!r} there, "
                                f"{v!r} now); pass another --out")
    os.makedirs(out, exist_ok=True)
    if write:  # one writer among several processes
        with open(path + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(path + ".tmp", path)


def _run(args) -> int:
    import jax

    from oq2vl_jax.data.tokenizer import load_tokenizer
    from oq2vl_jax.eval import fewshot
    from oq2vl_jax.eval.data import read_questions
    from oq2vl_jax.eval.runner import evaluate, table
    from oq2vl_jax.generate import load_checkpoint

    if args.shots < 0 or args.batch_size < 1:
        raise UserError("--shots must be >= 0 and --batch-size >= 1")
    bench, questions = _questions(args)
    demos = []
    if args.shots:
        if not bench.fewshot:
            raise UserError(f"{bench.name} is evaluated zero-shot in the original; --shots is for the VQA benchmarks")
        if not args.train:
            raise UserError("--shots needs --train (the split the demonstrations are drawn from)")
        train, _ = read_questions(args.train, bench.read_row)
        try:
            demos = fewshot.draw_demos(train, args.shots, args.seed, bench.demo_drop)
        except ValueError as e:
            raise UserError(str(e)) from None

    t0 = time.perf_counter()
    model, cfg, step = load_checkpoint(args.checkpoint, args.step, dtype=args.dtype)
    tok_path = args.tokenizer or cfg.tokenizer
    if not tok_path:
        raise UserError(f"{args.checkpoint}/config.yaml names no tokenizer; pass --tokenizer")
    tokenizer = load_tokenizer(tok_path)
    print(f"loaded {args.checkpoint} step {step} in {time.perf_counter() - t0:.1f}s; "
          f"{len(questions)} {bench.name} questions, {args.shots} shots, {jax.local_device_count()} local devices",
          file=sys.stderr)
    _check_same_run(args.out, {"benchmark": bench.name, "data": os.path.abspath(args.data),
                               "checkpoint": os.path.abspath(args.checkpoint), "step": step, "shots": args.shots,
                               "seed": args.seed, "limit": args.limit, "dtype": args.dtype},
                    write=jax.process_index() == 0)
    metrics = evaluate(model, tokenizer, bench, questions, args.out, demos=demos, batch_size=args.batch_size,
                       process_index=jax.process_index(), process_count=jax.process_count())
    if metrics:
        print(table(metrics))
    return 0


def _score(args) -> int:
    from oq2vl_jax.eval import predictions
    from oq2vl_jax.eval.runner import compute_metrics, table

    bench, questions = _questions(args)
    if not os.path.exists(args.predictions):
        raise FileNotFoundError(f"predictions file not found: {args.predictions}")
    records = predictions.load(args.predictions)
    known = {q.id for q in questions}
    unknown = [k for k in records if k not in known]
    if unknown:
        print(f"{args.predictions}: {len(unknown)} predictions for ids not in {args.data} (ignored), e.g. "
              f"{unknown[0]!r}", file=sys.stderr)
    metrics = compute_metrics(bench, questions, records)
    print(table(metrics), file=sys.stderr)
    print(json.dumps(metrics))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: _run(args) if args.cmd == "run" else _score(args), args)


if __name__ == "__main__":
    sys.exit(main())
