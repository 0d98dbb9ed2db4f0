"""Checks of what a user passed, made before anything expensive (a checkpoint load) starts."""

from __future__ import annotations

import os

from oq2vl_jax.cli import UserError


class BadArgument(UserError, ValueError):
    """A command-line value out of its range; the message names the flag."""


class ImageError(UserError, ValueError):
    """An image that is missing or cannot be decoded; the message names the file."""


def check_generate_args(args) -> None:
    """generate's numeric flags (Generator.__call__ would only refuse them after the model loads)."""
    if args.max_new_tokens < 1:
        raise BadArgument(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise BadArgument(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise BadArgument(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.batch_size < 1:
        raise BadArgument(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.step is not None and args.step < 0:
        raise BadArgument(f"--step must be >= 0, got {args.step}")


def check_images(images) -> None:
    """Every image path exists and decodes (PIL images and arrays given in-process pass as they are)."""
    from PIL import Image

    for im in images:
        if not isinstance(im, (str, os.PathLike)):
            continue
        if not os.path.isfile(im):
            raise ImageError(f"image {os.fspath(im)!r} not found")
        try:
            with Image.open(im) as opened:
                opened.load()
        except Exception as e:  # noqa: BLE001 (PIL raises many types for a damaged file)
            raise ImageError(f"image {os.fspath(im)!r} cannot be decoded: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}") from None
