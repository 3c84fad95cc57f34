"""`python -m qconvert.cli`: what batch and sweep run for each job, in its own process."""

from qconvert.cli import app

app()
