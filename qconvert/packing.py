"""Pack n-bit integer codes into bytes, and back.

One bit order for every width: each row is a little-endian bit stream. Code ``j`` of a row fills
bits ``j*bits .. j*bits+bits-1`` of that stream, and stream bit ``i`` is bit ``i % 8`` of byte
``i // 8``. Rows are padded with zero bits to a whole byte, so every row starts on a byte and a
row can be sliced without unpacking its neighbours. For 3 bits, eight codes fill three bytes::

    codes   c0 c1 c2 ... c7, cᵢₖ = bit k of code i
    byte 0  [c2₁ c2₀ c1₂ c1₁ c1₀ c0₂ c0₁ c0₀]   (most significant bit on the left)
    byte 1  [c5₀ c4₂ c4₁ c4₀ c3₂ c3₁ c3₀ c2₂]
    byte 2  [c7₂ c7₁ c7₀ c6₂ c6₁ c6₀ c5₂ c5₁]

For 4 bits this is "low nibble first", which read as little-endian int32 words is exactly
compressed-tensors' ``pack_to_int32`` layout (eight codes per word, code 0 in the lowest bits).
"""

import ctypes
from functools import cache

import torch

from qconvert import native

# 4-bit codes, the common case, packed in C (`native.py`): two 32-byte loads of codes become one 32-byte
# store of nibble pairs (vpmaddubsw multiplies each pair by (1, 16) and adds), 2x faster than the torch
# shifts. The same bytes as `_pack_within_bytes`; the torch code serves where it cannot be built.
PACK4_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

void pack4(const uint8_t *codes, uint8_t *out, int64_t rows, int64_t columns, int threads) {
    const int64_t bytes = (columns + 1) / 2;
    const __m256i pair = _mm256_set1_epi16(0x1001); /* bytes 1, 16: low code + 16 x high code */
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * columns;
        uint8_t *o = out + r * bytes;
        int64_t k = 0;
        for (; 2 * k + 64 <= columns; k += 32) {
            __m256i a = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(c + 2 * k)), pair);
            __m256i b = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(c + 2 * k + 32)), pair);
            /* packus interleaves the 128-bit lanes of a and b; the permute puts them back in order */
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(o + k), packed);
        }
        for (; k < bytes; k++) o[k] = (uint8_t)(c[2 * k] | (2 * k + 1 < columns ? c[2 * k + 1] << 4 : 0));
    }
}
"""


@cache
def _pack4_library() -> ctypes.CDLL | None:
    lib = native.load("pack4", PACK4_SOURCE)
    if lib is not None:
        lib.pack4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        lib.pack4.restype = None
    return lib


def packed_row_bytes(columns: int, bits: int) -> int:
    """Bytes one packed row of `columns` codes occupies."""
    return (columns * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes of shape (rows, columns) into uint8 of shape (rows, packed_row_bytes).

    Args:
        codes: integer tensor with every value in [0, 2**bits).
        bits: bits per code, 1 to 8.

    Returns:
        A contiguous uint8 tensor; `unpack_codes(result, bits, columns)` gives `codes` back.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes; bits must be 1 to 8")
    rows, columns = codes.shape
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bits == 4 and codes.device.type == "cpu" and _pack4_library() is not None:
        codes = codes.contiguous()
        packed = torch.empty(rows, packed_row_bytes(columns, 4), dtype=torch.uint8)
        _pack4_library().pack4(codes.data_ptr(), packed.data_ptr(), rows, columns, torch.get_num_threads())
        return packed
    if 8 % bits == 0:
        return _pack_within_bytes(codes, bits)[:, : packed_row_bytes(columns, bits)].contiguous()
    return _pack_across_bytes(codes, bits)[:, : packed_row_bytes(columns, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 (rows, packed_row_bytes) -> uint8 codes (rows, columns)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot unpack {bits}-bit codes; bits must be 1 to 8")
    if packed.shape[1] != packed_row_bytes(columns, bits):
        raise ValueError(
            f"a packed row of {columns} {bits}-bit codes has {packed_row_bytes(columns, bits)} "
            f"bytes, got {packed.shape[1]}"
        )
    if bits == 8:
        return packed.contiguous()
    if 8 % bits == 0:
        return _unpack_within_bytes(packed, bits)[:, :columns].contiguous()
    return _unpack_across_bytes(packed, bits)[:, :columns].contiguous()


def _pad_columns(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[1] % multiple
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def _pack_within_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # 1, 2 and 4 bits: whole codes fit in a byte, so plain uint8 shifts suffice.
    per_byte = 8 // bits
    groups = _pad_columns(codes, per_byte).view(codes.shape[0], -1, per_byte)
    packed = groups[..., 0].clone()
    for j in range(1, per_byte):
        packed |= groups[..., j] << (j * bits)
    return packed


def _unpack_within_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    return torch.stack(parts, dim=-1).view(packed.shape[0], -1)


def _pack_across_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    # 3, 5, 6, 7 bits: eight codes make exactly `bits` bytes; assemble them in an int64 word.
    rows = codes.shape[0]
    groups = _pad_columns(codes, 8).view(rows, -1, 8).to(torch.int64)
    word = groups[..., 0].clone()
    for j in range(1, 8):
        word |= groups[..., j] << (j * bits)
    parts = [(word >> (8 * k)) & 0xFF for k in range(bits)]
    return torch.stack(parts, dim=-1).to(torch.uint8).view(rows, -1)


def _unpack_across_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    rows = packed.shape[0]
    groups = _pad_columns(packed, bits).view(rows, -1, bits).to(torch.int64)
    word = groups[..., 0].clone()
    for k in range(1, bits):
        word |= groups[..., k] << (8 * k)
    mask = (1 << bits) - 1
    parts = [(word >> (j * bits)) & mask for j in range(8)]
    return torch.stack(parts, dim=-1).to(torch.uint8).view(rows, -1)


def pack_words(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack codes along the last dimension into int32 words of 32 / bits codes each, as GPTQ and AWQ store
    them: slot i of a word (bits i·bits ... i·bits + bits - 1) holds code `order[i]` of its run (code i
    when `order` is None; AutoAWQ's order is 0 2 4 6 1 3 5 7).

    Args:
        codes: integers in [0, 2**bits), shape (..., n) with n a multiple of 32 / bits; bits 2, 4 or 8.

    Returns:
        int32 (..., n·bits / 32), the same 32 bits as the unsigned word.
    """
    per_word = 32 // bits
    values = codes.to(torch.int64) & (2**bits - 1)
    runs = values.reshape(*values.shape[:-1], -1, per_word)
    if order is not None:
        runs = runs[..., list(order)]
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_words(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack_words`: int32 (..., w) -> int64 codes (..., w · 32 / bits)."""
    per_word = 32 // bits
    values = words.to(torch.int64) & 0xFFFFFFFF
    slots = torch.stack([(values >> (bits * i)) & (2**bits - 1) for i in range(per_word)], dim=-1)
    if order is not None:
        slots = slots[..., [order.index(c) for c in range(per_word)]]
    return slots.reshape(*words.shape[:-1], -1)


def pack_stream_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) codes -> int32 (rows, ceil(n·bits / 32)): each row one little-endian bit stream (the
    order of `pack_codes`) padded to whole 32-bit words, as compressed-tensors' pack-quantized stores it."""
    packed = pack_codes(codes, bits)
    pad = -packed.shape[1] % 4
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    # Through a flat view: a single-row tensor may carry strides that forbid viewing bytes as words.
    return packed.reshape(-1).view(torch.int32).view(packed.shape[0], -1)


def unpack_stream_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_stream_words`: int32 (rows, w) -> uint8 codes (rows, count)."""
    # Through a flat copy: a (n, 1) transpose counts as contiguous yet keeps a stride that forbids the view.
    rows = words.shape[0]
    packed = words.reshape(-1).clone().view(torch.uint8).view(rows, -1)[:, : -(-count * bits // 8)]
    return unpack_codes(packed.contiguous(), bits, count)
