"""Errors a user can cause and fix.

Library code raises these with a message that says what is wrong and how to fix it; only `cli.py`
catches them, prints the message as one line and exits with `exit_code`. Anything else that escapes
is a bug and keeps its traceback.
"""


class QConvertError(Exception):
    """Bad input or a request qconvert cannot honour (exit code 2)."""

    exit_code = 2


class SourceError(QConvertError):
    """The checkpoint cannot be found or read."""


class SchemeError(QConvertError):
    """The requested bits, group size or quantizer cannot be applied."""


class OutputError(QConvertError):
    """The output location cannot be written (for example it exists and --force was not given)."""


class VerificationError(QConvertError):
    """A qconvert output failed `verify` (exit code 3)."""

    exit_code = 3


class UnsupportedModelError(SchemeError):
    """The model's architecture or layout is one qconvert cannot run or convert this way (exit code 7)."""

    exit_code = 7


class QualityGateError(QConvertError):
    """A quality or size limit (eval --max-ppl..., verify --max-bpw) was crossed (exit code 4)."""

    exit_code = 4


class ResourceError(QConvertError):
    """The plan predicts more memory or disk than the machine has (exit code 6)."""

    exit_code = 6
