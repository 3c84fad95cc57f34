"""What every command shares: the Typer app, consoles that never read text as markup, the one place
errors, OS errors and signals become a sentence and an exit code, and the options several commands take."""

import errno
import logging
import os
import signal
import sys
import threading
import traceback
import weakref
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console
from rich.text import Text

from qconvert import __version__
from qconvert.errors import QConvertError

app = typer.Typer(
    help="Turn a Hugging Face checkpoint into a compact quantized model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# markup=False everywhere: paths, tensor names and messages are printed as they are ("qconvert[hf]"
# must not lose its brackets); styles come only from `say`'s Text.
stderr = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)  # a path is never broken across lines


def stdout_console() -> Console:
    # Tables piped to a file or a CI log should not wrap at 80 columns.
    console = Console(markup=False, highlight=False)
    return console if console.is_terminal else Console(width=200, markup=False, highlight=False)


def say(label: str, style: str, text: str, console: Console | None = None) -> None:
    """One line: a styled label, then `text` exactly as given."""
    (console or stderr).print(Text.assemble((label, style), " ", text), soft_wrap=True)


_debug = False


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what CI runners and `timeout` send), handled exactly like Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def run_command(action: Callable[[], int | None]) -> None:
    """Run a command body; a user error, an OS error or an interruption becomes one line on stderr and its
    exit code. Anything else is a bug in qconvert: its traceback is kept, with a request to report it."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (the CLI called from a worker thread): signals stay as they are
        previous = None
    try:
        code = action()
    except QConvertError as exc:
        if _debug:
            raise
        say("error:", "bold red", str(exc))
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt as exc:
        kept = getattr(exc, "qconvert_note", None)
        stderr.print(
            f"{'terminated' if isinstance(exc, _Terminated) else 'interrupted'}; nothing was published."
            + (f" {kept}" if kept else "")
        )
        raise typer.Exit(code=143 if isinstance(exc, _Terminated) else 130) from None
    except OSError as exc:
        if _debug:
            raise
        code = 6 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 2
        say("error:", "bold red", _os_error_sentence(exc))
        raise typer.Exit(code=code) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise  # usage errors: typer prints them itself (exit 2)
    except Exception:
        traceback.print_exc()
        say(
            "error:", "bold red", f"this is a bug in qconvert {__version__}; please report it with the traceback above."
        )
        raise typer.Exit(code=1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if code:
        raise typer.Exit(code=code)


def _os_error_sentence(exc: OSError) -> str:
    """One sentence for an OS error: what failed, on which path, and what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    advice = {
        errno.ENOSPC: "nothing was published; free some space or write the output elsewhere with -o",
        errno.EDQUOT: "nothing was published; free some space or write the output elsewhere with -o",
        errno.EACCES: "check the permissions, or write the output elsewhere with -o",
        errno.EPERM: "check the permissions, or write the output elsewhere with -o",
        errno.EROFS: "write the output elsewhere with -o",
        errno.ENOENT: "check that the path exists and was not moved away while qconvert ran",
    }.get(exc.errno, "")
    return f"{reason}{':' if where else ''}{where}" + (f"; {advice}." if advice else ".")


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors too.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    global _debug
    _debug = debug
    if version:
        print(f"qconvert {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())
        raise typer.Exit(code=2)


def settings_from_flags(recipe: Path | None, flags: dict, calibration_flags: dict):
    """Settings from the recipe and the flags as typer gives them (lists, size strings, paths)."""
    from qconvert.settings import settings_from_options  # imports torch: not at --help time

    return settings_from_options(recipe, flags, calibration_flags)


def print_export(report) -> None:
    stderr.print(
        f"wrote {report.destination} ({report.format}): {len(report.exact)} tensors exact, "
        f"{len(report.repacked)} repacked on the same grid (offsets rounded to the scales' float type), "
        f"{len(report.requantized)} requantized, {len(report.dequantized)} written as float (no block of the "
        "format fits their rows)"
    )
    for name in report.requantized:
        stderr.print(f"  requantized: {name}")
    for name in report.dequantized:
        stderr.print(f"  as float: {name}")


def exit_now(code: int) -> None:
    """End the process with `code` without tearing the interpreter down, when nothing is left to clean up.

    With torch imported, Python's own shutdown (freeing every module's objects) takes 0.43 s here
    (`python -c "import torch"` against the same with os._exit: 1.27 against 0.84 s), a sixth of a
    730M model's conversion. Nothing is skipped that matters: the streams are flushed and logging shut
    down first, and the normal exit runs instead while anything else would want the shutdown: a
    thread that is not a daemon, a pending removal of a temporary folder (`weakref.finalize`), or Ray,
    whose exit handler stops the processes it started.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    pending = any(  # a temporary folder or file still to be removed (torch's own finalizers only free memory)
        info.atexit and getattr(info.func, "__module__", None) == "tempfile"
        for info in list(weakref.finalize._registry.values())
    )
    if others or pending or "ray" in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what was written is all there is
            pass
    os._exit(code)


def run_program() -> None:
    """The `qconvert` program (and `python -m qconvert.cli`): the app, then `exit_now`."""
    try:
        app()
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    exit_now(code)
