import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconvert import packing
from qconvert.limits import SUPPORTED_BITS
from qconvert.packing import pack_codes, packed_row_bytes, unpack_codes


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS + (1, 7)))
    rows = draw(st.integers(1, 9))
    columns = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, columns), generator=g, dtype=torch.uint8), bits


@settings(deadline=None, max_examples=300)
@given(codes_and_bits())
def test_unpack_inverts_pack(case):
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (codes.shape[0], packed_row_bytes(codes.shape[1], bits))
    assert torch.equal(unpack_codes(packed, bits, codes.shape[1]), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codes_use_exactly_their_bits(bits):
    codes = torch.randint(0, 2**bits, (3, 64), dtype=torch.uint8)
    assert pack_codes(codes, bits).numel() == 3 * 64 * bits // 8


def test_documented_bit_order():
    # 3 bits: code j fills bits 3j..3j+2 of the row's little-endian bit stream.
    codes = torch.tensor([[0b101, 0b011, 0b110, 0, 0, 0, 0, 0b111]], dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    stream = int.from_bytes(bytes(packed[0].tolist()), "little")
    assert [(stream >> (3 * j)) & 7 for j in range(8)] == codes[0].tolist()
    # 4 bits: low nibble first.
    assert pack_codes(torch.tensor([[0x1, 0xF]], dtype=torch.uint8), 4).tolist() == [[0xF1]]


def test_wrong_packed_width_is_refused():
    with pytest.raises(ValueError, match="bytes"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.uint8), 4, 12)


@pytest.mark.skipif(packing._pack4_library() is None, reason="no C compiler or no AVX2 here")
@pytest.mark.parametrize("shape", [(3, 7), (5, 63), (4, 64), (2, 65), (7, 130), (64, 2048), (1, 1)])
def test_4_bit_codes_packed_in_c_equal_the_torch_packing(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = packing._pack_within_bytes(codes, 4)[:, : packing.packed_row_bytes(shape[1], 4)]
    assert torch.equal(packing.pack_codes(codes, 4), reference)
    assert torch.equal(packing.pack_codes(codes.t().contiguous().t(), 4), reference)  # strided codes too
