"""``graphgrow zoo``: the bundled reference models."""

from __future__ import annotations

from . import exit_codes


def run(args) -> int:
    from .. import models

    for name, e in models.ZOO.items():
        print(f"{name:22s} input {str(e.input_shape):18s} {e.description}")
    return exit_codes.OK


def add_parser(sub) -> None:
    sub.add_parser("zoo", help="list the bundled reference models").set_defaults(func=run)
