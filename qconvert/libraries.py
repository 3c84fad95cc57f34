"""Driving third-party libraries (transformers, compressed-tensors) without their own progress bars and
reports: qconvert says what matters once, in its own words, and keeps what they wrote for its errors."""

import io
import os
import sys
import tempfile
from contextlib import contextmanager, redirect_stderr
from typing import Iterator


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()  # its loading bars would interleave with ours on stderr


class LibraryLog:
    """What the libraries wrote while silenced (`quiet_libraries`), for an error message to quote."""

    text = ""

    def errors(self, most: int = 2) -> str:
        lines = [line.strip() for line in self.text.splitlines() if "Error" in line or "error" in line]
        return "; ".join(dict.fromkeys(lines[-most:]))


@contextmanager
def quiet_libraries() -> Iterator[LibraryLog]:
    """transformers' and compressed-tensors' own reports and progress bars off while qconvert drives them:
    qconvert says what matters once, in its own words. What they wrote is kept in the yielded log."""
    import logging

    from transformers.utils import logging as hf_logging

    quiet_transformers()
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.WARNING)  # its loading report (kept in the log, not shown) is a warning
    # Progress bars the libraries draw whatever they are told (some hold on to the stream they first saw),
    # so stderr goes to a file at the file descriptor as well as in Python.
    sys.stderr.flush()
    sys.__stderr__.flush()
    saved = os.dup(2)
    log = LibraryLog()
    captured = io.StringIO()
    try:
        with tempfile.TemporaryFile("w+") as sink, redirect_stderr(captured):
            os.dup2(sink.fileno(), 2)
            try:
                yield log
            finally:
                sys.__stderr__.flush()  # the libraries' log handlers hold the real stream, not sys.stderr
                os.dup2(saved, 2)
                sink.seek(0)
                log.text = sink.read() + captured.getvalue()
    finally:
        os.close(saved)
        hf_logging.set_verbosity(previous)
