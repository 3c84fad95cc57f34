"""GPTQ: int32 word packing round trips for every width and order (`packing.pack_words`), and the export
against an unpacking written from AutoGPTQ's documented format (its loaders need CUDA builds)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import qconvert
from qconvert.conversion import convert
from qconvert.formats.awq import AWQ_ORDER
from qconvert.formats.export import export
from qconvert.formats.gptq import pack_int32
from qconvert.packing import pack_words, unpack_words
from qconvert.quantizers.base import QuantizedTensor
from qconvert.settings import Settings

torch.set_grad_enabled(False)


@settings(deadline=None, max_examples=100)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 6),
    words=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    shuffled=st.booleans(),
)
def test_words_round_trip_for_every_width_and_order(bits, rows, words, seed, shuffled):
    per_word = 32 // bits
    codes = torch.randint(0, 2**bits, (rows, words * per_word), generator=torch.Generator().manual_seed(seed))
    order = (
        tuple(torch.randperm(per_word, generator=torch.Generator().manual_seed(seed)).tolist()) if shuffled else None
    )
    packed = pack_words(codes, bits, order)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_words(packed, bits, order), codes)


def test_the_first_code_sits_in_the_lowest_bits_and_awq_interleaves():
    codes = torch.arange(8).view(1, 8)
    assert pack_words(codes, 4).item() == 0x76543210
    assert pack_words(codes, 4, AWQ_ORDER).item() == 0x75316420  # slot i holds column AWQ_ORDER[i]


def test_gptq_packs_qweight_down_the_rows_as_the_reader_unpacks_it():
    codes = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(0))  # (in, out)
    qweight = pack_int32(codes, 4)  # (in / 8, out)
    assert qweight.shape == (8, 24)
    assert torch.equal(unpack_words(qweight.t(), 4).t(), codes)


def _reference_gptq_weight(qweight, qzeros, scales, g_idx, bits):
    """AutoGPTQ v1, as its README and kernels describe it: codes packed down the input dimension,
    zeros along the output dimension, each stored as zero − 1."""
    per_word, mask = 32 // bits, 2**bits - 1
    codes = torch.stack([(qweight >> (bits * k)) & mask for k in range(per_word)], dim=1).reshape(-1, qweight.shape[1])
    zeros = (
        torch.stack([(qzeros >> (bits * k)) & mask for k in range(per_word)], dim=2).reshape(qzeros.shape[0], -1) + 1
    )
    g = g_idx.long()
    return (scales[g].float() * (codes - zeros[g]).float()).t()


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, True), (4, 64, False), (8, 32, False), (2, 32, True)])
def test_gptq_export_unpacks_to_qconvert_s_weights(tmp_path, tiny_lm, bits, group, symmetric):
    out = convert(tiny_lm, tmp_path / "out", Settings(bits=bits, group_size=group, symmetric=symmetric)).output
    report = export(out, "gptq")
    tensors = load_file(report.destination / "model.safetensors")
    config = json.loads((report.destination / "config.json").read_text())["quantization_config"]
    assert (
        config | {"bits": bits, "group_size": group, "sym": symmetric, "quant_method": "gptq", "desc_act": False}
        == config
    )
    assert json.loads((report.destination / "quantize_config.json").read_text())["checkpoint_format"] == "gptq"
    ours = qconvert.load(out, torch.float32)
    linears = [n for n in ours if n.endswith("proj.weight")]
    for name in linears:
        module = name.removesuffix(".weight")
        assert tensors[f"{module}.qweight"].dtype == torch.int32 and tensors[f"{module}.scales"].dtype == torch.float16
        weight = _reference_gptq_weight(
            *(tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")), bits
        )
        assert torch.equal(weight, ours[name]), name
    assert set(linears) <= set(report.exact)
    assert (report.destination / "tokenizer.json").is_file()


def test_gptq_v1_moves_a_zero_of_zero_up_one_code():
    from qconvert.formats.gptq import _v1_codes_and_zeros

    codes = torch.tensor([[0, 3, 14, 2], [15, 0, 1, 1]], dtype=torch.uint8)
    q = QuantizedTensor(
        codes=codes,
        scales=torch.ones(2, 2, dtype=torch.float16),
        zeros=torch.tensor([[0, 2], [0, 5]], dtype=torch.uint8),
        bits=4,
        group_size=2,
        shape=(2, 4),
        dtype=torch.float32,
    )
    moved, zeros, clipped = _v1_codes_and_zeros(q)
    assert zeros.tolist() == [[1, 2], [1, 5]] and (zeros >= 1).all()
    assert moved.tolist() == [[1, 4, 14, 2], [15, 1, 1, 1]]
    assert clipped  # row 1's 15 could not move up to 16
    assert torch.equal(
        (moved - zeros.repeat_interleave(2, 1))[0], (codes.int() - q.zeros.int().repeat_interleave(2, 1))[0]
    )
