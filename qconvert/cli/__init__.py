"""The `qconvert` command line: parse options, call the library, map errors to exit codes.

One module per group of commands, each registering them on the app in `common.py`; the order below
is the order `qconvert --help` lists them in. Exit codes are documented in the README.
"""
# isort: skip_file

from qconvert.cli.common import app, run_program
from qconvert.cli import convert, plan, inspect, evaluate, batch, export  # noqa: F401  (each registers its commands)

__all__ = ["app", "run_program"]
