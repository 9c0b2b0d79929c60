"""The argparse pieces shared by the command lines (`dsv32`, `dsv32 train`, `dsv32 convert`): a
parser whose usage errors are one line (exit 2), and argument types whose bad values are such usage
errors, naming the argument and what it must be."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return x


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= n < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535 (0: any free one), got {n}")
    return n


def seconds(text: str) -> float:
    """A number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


def checked(convert, check):
    """A type that converts the text, then validates the value with `check` (one of
    `dsv32_jax.engine.checks`, whose ValueError becomes the usage error)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {convert.__name__}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def mesh(text: str) -> tuple[int, int, int]:
    """'d,e,t' -> (data, expert, tensor) (`sharding.mesh.parse_mesh`)."""
    from sharding.mesh import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
