"""Text for evaluation and calibration: a UTF-8 file, or a public set through the `datasets` library."""

from pathlib import Path

from qconvert.errors import QConvertError, SourceError


def read_text(text_file: Path | None, dataset: str | None, split: str = "test") -> str:
    """The evaluation (or, with split="train", calibration) text: a file, or a public set through `datasets`."""
    if text_file is not None:
        if not text_file.is_file():
            raise SourceError(f"text file {text_file} does not exist.")
        return text_file.read_text(encoding="utf-8", errors="replace")
    if dataset != "wikitext2":
        raise QConvertError("give --text FILE, or --dataset wikitext2.")
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except ImportError as exc:
        raise QConvertError(
            "--dataset needs the `datasets` package (pip install datasets); --text FILE works without it."
        ) from exc
    except Exception as exc:
        raise SourceError(
            f"cannot fetch wikitext-2 ({type(exc).__name__}); use --text FILE on a machine without the hub."
        ) from exc
    return "\n\n".join(rows["text"])
