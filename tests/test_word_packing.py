"""GPTQ's and AWQ's int32 word packing (`packing.pack_words`): every width and order round-trips, and the
GPTQ exporter's packing is the inverse of the GPTQ reader's."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconvert.formats.awq import AWQ_ORDER
from qconvert.formats.gptq import pack_int32
from qconvert.packing import pack_words, unpack_words


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
