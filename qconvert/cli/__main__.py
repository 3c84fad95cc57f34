"""`python -m qconvert.cli`: the `qconvert` program (what batch and sweep run for each job, in its own process)."""

from qconvert.cli.common import run_program

run_program()
