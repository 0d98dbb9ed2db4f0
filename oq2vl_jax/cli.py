"""Shared command-line plumbing for every entry point: flags defined once, logging, exit codes.

Exit codes: 0 ok; 2 bad input or config (one named line on stderr, no traceback); 1 an unexpected
error (Python's own traceback); 130 interrupted before anything could be saved.

    def main(argv=None) -> int:
        p = cli.parser("python -m oq2vl_jax.thing", __doc__)
        cli.add_config(p)
        args = p.parse_args(argv)
        return cli.run(lambda: _main(args), args)
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input, config or environment the user can fix: reported as one line, exit 2."""


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first line of the module docstring; --log-level included."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n")[0])
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="oq2vl_jax log level (default INFO)")
    return p


def add_config(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    """--config YAML and --set KEY=VALUE overrides (values parsed as YAML)."""
    p.add_argument("--config", required=required, help=help or "YAML config, e.g. configs/tiny.yaml")
    add_set(p)


def add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", action="extend",
                   help="config overrides, e.g. --set optim.lr=3e-5 data.seq_len=2048")


def add_tokenizer(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--tokenizer", help=help or "HF tokenizer directory (default: the config's `tokenizer`)")


def add_out(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    p.add_argument("--out", required=required, help=help or "output directory")


def add_dtype(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help=help or "compute dtype (default: the config's)")


def load_config(args: argparse.Namespace, values: dict | None = None):
    """The typed config from --config (optional: the defaults without it) and --set, then `values`
    ({dotted key: value}, e.g. from flags that override keys) on top."""
    from oq2vl_jax.config import config_from_dict
    from oq2vl_jax.configlib import ConfigError, apply_overrides, load_yaml, set_path

    path = getattr(args, "config", None)
    data = load_yaml(path) if path else {}
    try:
        apply_overrides(data, list(getattr(args, "set", []) or []))
        for key, value in (values or {}).items():
            set_path(data, key, value)
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def setup_logging(level: str = "INFO") -> None:
    """Our own handler on the package logger: absl (pulled in by orbax/grain) may own the root logger.
    absl's own INFO/WARNING chatter (orbax, grain) is lowered to errors."""
    pkg = logging.getLogger("oq2vl_jax")
    if not any(getattr(h, "_oq2vl", False) for h in pkg.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._oq2vl = True
        pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False
    for name in ("absl", "orbax", "grain"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass


def bad_input_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2, one line): ours and the config's."""
    from oq2vl_jax.configlib import ConfigError

    return (UserError, ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run(body: Callable[[], int | None], args: argparse.Namespace | None = None) -> int:
    """Runs an entry point's body: sets up logging, maps bad input to `error: ...` + exit 2.
    Anything else keeps its traceback (exit 1)."""
    setup_logging(getattr(args, "log_level", "INFO") if args is not None else "INFO")
    try:
        rc = body()
    except bad_input_types() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if rc is None else int(rc)


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split("\n")) or type(e).__name__
