"""Calibration samples: fixed-length token windows drawn from a text, reproducibly."""

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from qconvert.errors import SchemeError, SourceError

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class CalibrationSettings:
    """Where calibration activations come from; recorded in the manifest.

    Attributes:
        text: a text file; or dataset: "wikitext2" (its train split, through `datasets`).
        samples: windows drawn; seqlen: tokens per window; seed: for the window positions.
        batch_size: windows per forward pass (bounds activation memory; part of the numerics).
        dtype: what the blocks' forward passes compute in: "float32", "bfloat16", or "auto" (see
            `resolved`). Hessians, solves and training are float32 whatever it is.
    """

    text: str | None = None
    dataset: str | None = None
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in COMPUTE_DTYPES:
            raise SchemeError(f"--calib-dtype {self.dtype} is not one of {', '.join(COMPUTE_DTYPES)}.")
        if (self.text is None) == (self.dataset is None):
            raise SchemeError("calibration needs exactly one source: --calib FILE or --calib-dataset wikitext2.")
        for option, value in (
            ("--calib-samples", self.samples),
            ("--calib-seqlen", self.seqlen),
            ("--calib-batch-size", self.batch_size),
        ):
            if value <= 0:
                raise SchemeError(f"{option} must be positive, not {value}.")

    def resolved(self, weight_dtypes: set[torch.dtype], sequential: bool) -> "CalibrationSettings":
        """These settings with an "auto" dtype decided from the checkpoint, not the machine: bfloat16
        where a sequential quantizer (gptq) calibrates bfloat16 weights (the dtype the model was
        trained in and that runtimes run it in, with activations rounded as they round them), else
        float32. On a CPU with bfloat16 dot products (AVX512-BF16, AMX) a block's forward runs about
        2.4x faster in bfloat16 than in float32 (SmolLM2, 128 x 512 tokens: 1.2 s against 3.0 s)."""
        if self.dtype != "auto":
            return self
        bf16 = sequential and weight_dtypes == {torch.bfloat16}
        return replace(self, dtype="bfloat16" if bf16 else "float32")

    def describe(self) -> dict:
        """Settings plus the text's sha256, for the manifest and for matching a resumed run."""
        described = asdict(self)
        if self.text is not None:
            path = Path(self.text)
            if not path.is_file():
                raise SourceError(f"calibration text {path} does not exist.")
            described["text"] = str(path.resolve())
            described["text_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return described


def calibration_windows(tokenizer_folder: Path, settings: CalibrationSettings) -> torch.Tensor:
    """(samples, seqlen) token ids from windows at random offsets of the text, fixed by the seed.

    Raises:
        SourceError: no tokenizer, or a text too short for one window.
    """
    from transformers import AutoTokenizer

    from qconvert.io.text import read_text

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    except (OSError, ValueError) as exc:
        raise SourceError(f"calibration needs the model's tokenizer, and none loads from {tokenizer_folder}.") from exc
    text = read_text(Path(settings.text) if settings.text else None, settings.dataset, split="train")
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[
        0
    ]  # no "longer than the model" warning: it is cut into windows
    if len(ids) < settings.seqlen:
        raise SourceError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of --calib-seqlen {settings.seqlen}."
        )
    generator = torch.Generator().manual_seed(settings.seed)
    starts = torch.randint(0, len(ids) - settings.seqlen + 1, (settings.samples,), generator=generator)
    return torch.stack([ids[s : s + settings.seqlen] for s in starts.tolist()])
