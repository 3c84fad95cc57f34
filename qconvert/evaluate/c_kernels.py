"""One input row times a packed weight, in C with AVX2, for the codes Inductor decodes slowly.

Why hand-written: Inductor has no vector table lookup. Its best expression of a 16-value table
T[q], the multilinear polynomial of `kernels.py`, costs about six instructions per weight, so nf4
decoded no faster than float32 (SmolLM2: 44.5 against 43.1 ms/token); a gather was six times
slower still. AVX2's `vpermps` looks up eight floats in one instruction, so two lookups and a blend
decode eight codes: about one instruction per weight. The 8-bit codes (FP8 E4M3, and int8 in
groups, which torch's int8 kernel cannot take) come out of Inductor's code 2-4 times slower than
torch's own int8 kernel, and so do the integer planes of 2, 3, 5 and 6 bits, so they are here
too: a few integer instructions turn eight codes into floats.

Kernels, on `kernels.py`'s layout (one plane per weight; each group padded to `padded` columns):
- `table`: 4-bit codes of a 16-value table (nf4, iq4nl, mxfp4, nvfp4). Byte k of a group holds
  the codes of columns k (low nibble) and k + padded/2 (high nibble).
- `e4m3`: FP8 E4M3 codes (fp8, mxfp8, fp8-block): sign, exponent re-biased by 120 and mantissa
  placed in a float32's bits; subnormals (exponent 0) are the mantissa times 2**-9.
- `int`: integer codes of any width in up to three planes of 1, 2, 4 or 8 bits (int3 = 2 + 1, int6
  = 4 + 2, ...): Σ_g s·(Σ_planes 2**shift · Σ q·x) − Σ_g (z·s)·(Σ x), each plane's sub-codes
  shifted out and multiplied with their slice of the group's inputs.

The source is compiled once per machine by the system C compiler (`cc -O3 -mavx2 -mfma -fopenmp`,
`native.py`) into ~/.cache/qconvert/kernels/ under the source's hash, and called through ctypes on
the tensors' memory. Where it cannot be built or run (no compiler, a CPU without AVX2), `load()` returns None and
the compiled Inductor kernels serve instead.
"""

import ctypes
import time
from functools import cache

import torch

from qconvert import native
from qconvert.evaluate.kernels import Compiled

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* table[code] for eight codes 0-15: vpermps reads a code's low 3 bits, its bit 3 picks the half */
static inline __m256 lookup(__m256i codes, __m256 low, __m256 high) {
    __m256 a = _mm256_permutevar8x32_ps(low, codes), b = _mm256_permutevar8x32_ps(high, codes);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

/* y[r] = sum over groups g of scales[r, g] * sum over k of
          table[low(p[r, g, k])] * x[g, k] + table[high(p[r, g, k])] * x[g, half + k] */
void table_gemv(const float *x, const uint8_t *planes, const float *scales, const float *table, float *y,
                int64_t rows, int64_t groups, int64_t padded) {
    const int64_t half = padded / 2;
    const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    const __m256i nibble = _mm256_set1_epi32(15);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = planes + (r * groups + g) * half;
            const float *xl = x + g * padded, *xh = xl + half;
            __m256 acc = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 8 <= half; k += 8) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k)));
                acc = _mm256_fmadd_ps(lookup(_mm256_and_si256(v, nibble), low, high), _mm256_loadu_ps(xl + k), acc);
                acc = _mm256_fmadd_ps(lookup(_mm256_srli_epi32(v, 4), low, high), _mm256_loadu_ps(xh + k), acc);
            }
            float sum = hsum(acc);
            for (; k < half; k++) sum += table[p[k] & 15] * xl[k] + table[p[k] >> 4] * xh[k];
            total += scales[r * groups + g] * sum;
        }
        y[r] = total;
    }
}

/* eight E4M3 codes (uint8 in int32 lanes) -> their float values */
static inline __m256 e4m3(__m256i v) {
    const __m256i magnitude = _mm256_and_si256(v, _mm256_set1_epi32(0x7F));
    __m256 normal = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(magnitude, 20), _mm256_set1_epi32(120 << 23)));
    __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(magnitude, _mm256_set1_epi32(7))),
                                     _mm256_set1_ps(1.0f / 512.0f));
    __m256 is_subnormal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude));
    __m256 value = _mm256_blendv_ps(normal, subnormal, is_subnormal);
    __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24));
    return _mm256_or_ps(value, sign);
}

static inline float e4m3_scalar(uint8_t code) {
    int magnitude = code & 0x7F;
    float value = magnitude < 8 ? (magnitude & 7) / 512.0f : 0.0f;
    if (magnitude >= 8) {
        uint32_t bits = ((uint32_t)magnitude << 20) + (120u << 23);
        __builtin_memcpy(&value, &bits, 4);
    }
    return code & 0x80 ? -value : value;
}

/* y[r] = sum over groups g of scales[r, g] * sum over c of e4m3(codes[r, g, c]) * x[g, c] */
void e4m3_gemv(const float *x, const uint8_t *codes, const float *scales, float *y, int64_t rows, int64_t groups,
               int64_t padded) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = codes + (r * groups + g) * padded;
            const float *xg = x + g * padded;
            __m256 acc = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 8 <= padded; c += 8) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + c)));
                acc = _mm256_fmadd_ps(e4m3(v), _mm256_loadu_ps(xg + c), acc);
            }
            float sum = hsum(acc);
            for (; c < padded; c++) sum += e4m3_scalar(p[c]) * xg[c];
            total += scales[r * groups + g] * sum;
        }
        y[r] = total;
    }
}

/* sum over a group's columns of code * x for one bit plane of `bits` (1, 2, 4 or 8) bits: byte k holds
   the codes of columns k, k + chunk, ..., one per `bits` bits, chunk = padded * bits / 8 */
static inline float plane_dot(const uint8_t *p, const float *xg, int64_t padded, int64_t bits) {
    const int64_t per_byte = 8 / bits, chunk = padded / per_byte, mask = (1 << bits) - 1;
    const __m256i vmask = _mm256_set1_epi32(mask);
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= chunk; k += 8) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k)));
        for (int64_t j = 0; j < per_byte; j++) {
            __m256i q = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_set1_epi32(j * bits)), vmask);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_loadu_ps(xg + j * chunk + k), acc);
        }
    }
    float sum = hsum(acc);
    for (; k < chunk; k++)
        for (int64_t j = 0; j < per_byte; j++) sum += (float)((p[k] >> (j * bits)) & mask) * xg[j * chunk + k];
    return sum;
}

/* y[r] = sum over groups g of scales[r, g] * (sum over planes i of 2**shift_i * plane_dot_i)
          - offsets[r, g] * x_sums[g]: int codes in up to three planes of bits[i] bits,
          most significant first (bits 0: no plane) */
void int_gemv(const float *x, const uint8_t *p0, const uint8_t *p1, const uint8_t *p2, int64_t b0, int64_t b1,
              int64_t b2, const float *scales, const float *offsets, const float *x_sums, float *y, int64_t rows,
              int64_t groups, int64_t padded) {
    const uint8_t *planes[3] = {p0, p1, p2};
    const int64_t bits[3] = {b0, b1, b2};
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + g * padded;
            float dot = 0.0f;
            int64_t shift = b0 + b1 + b2;
            for (int i = 0; i < 3 && bits[i]; i++) {
                shift -= bits[i];
                const uint8_t *p = planes[i] + (r * groups + g) * (padded * bits[i] / 8);
                dot += (float)(1 << shift) * plane_dot(p, xg, padded, bits[i]);
            }
            total += scales[r * groups + g] * dot - offsets[r * groups + g] * x_sums[g];
        }
        y[r] = total;
    }
}

/* w[r, c] = scales[r, c / group] * table[code of (r, c)]: the (rows, columns) float32 weight, padding dropped */
void table_dequantize(const uint8_t *planes, const float *scales, const float *table, float *w,
                      int64_t rows, int64_t groups, int64_t padded, int64_t group, int64_t columns) {
    const int64_t half = padded / 2;
    const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    const __m256i nibble = _mm256_set1_epi32(15);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = planes + (r * groups + g) * half;
            const float scale = scales[r * groups + g];
            float *out = w + r * columns + g * group;
            const int64_t count = columns - g * group < group ? columns - g * group : group;
            int64_t k = 0;
            if (count == padded) { /* a whole group with no padding: vector stores */
                const __m256 s = _mm256_set1_ps(scale);
                for (; k + 8 <= half; k += 8) {
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k)));
                    _mm256_storeu_ps(out + k, _mm256_mul_ps(s, lookup(_mm256_and_si256(v, nibble), low, high)));
                    _mm256_storeu_ps(out + half + k, _mm256_mul_ps(s, lookup(_mm256_srli_epi32(v, 4), low, high)));
                }
            }
            for (; k < half; k++) { /* the rest, and padded groups: only the columns that exist */
                if (k < count) out[k] = scale * table[p[k] & 15];
                if (half + k < count) out[half + k] = scale * table[p[k] >> 4];
            }
        }
    }
}
"""


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built or run here."""
    start = time.perf_counter()
    lib = native.load("c_kernels", SOURCE)
    Compiled.seconds += time.perf_counter() - start  # the first call builds it (once per machine)
    if lib is None:
        return None
    for name in ("table_gemv", "table_dequantize", "e4m3_gemv", "int_gemv"):
        getattr(lib, name).restype = None
    lib.table_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.table_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    lib.e4m3_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.int_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    return lib


_check = native.check_tensor


def kernel_for(spec) -> str | None:
    """The C kernel for a `kernels.KernelSpec` ("table", "e4m3" or "int"), or None where none can run."""
    return None if load() is None else spec.values  # one C kernel for each kind of code values


def gemv(x: torch.Tensor, weight, table: torch.Tensor | None = None) -> torch.Tensor:
    """y = Ŵ x for one row, on the C kernel of `weight.spec` (`kernel_for`).

    Args:
        x: (groups, padded) float32, contiguous: the input grouped as the planes are
            (`kernels.grouped_input`).
        weight: a `kernels.PackedWeight` with float32 contiguous scales (and offsets).
        table: (16,) float32, the values of a 16-value table grid's codes.

    Returns:
        (rows,) float32.
    """
    spec = weight.spec
    rows, groups = weight.scales.shape
    _check(x, (groups, spec.padded), torch.float32)
    _check(weight.scales, (rows, groups), torch.float32)
    for plane, bits in zip(weight.planes, spec.planes):
        _check(plane, (rows, groups, spec.padded * bits // 8), torch.uint8)
    y = torch.empty(rows, dtype=torch.float32)
    pointers = (x.data_ptr(), weight.planes[0].data_ptr())
    if spec.values == "table":
        _check(table, (16,), torch.float32)
        load().table_gemv(
            *pointers, weight.scales.data_ptr(), table.data_ptr(), y.data_ptr(), rows, groups, spec.padded
        )
    elif spec.values == "e4m3":
        load().e4m3_gemv(*pointers, weight.scales.data_ptr(), y.data_ptr(), rows, groups, spec.padded)
    else:
        _check(weight.offsets, (rows, groups), torch.float32)
        planes = [p.data_ptr() for p in weight.planes] + [None] * (3 - len(weight.planes))
        bits = list(spec.planes) + [0] * (3 - len(spec.planes))
        sums = x.sum(-1)
        load().int_gemv(x.data_ptr(), *planes, *bits, weight.scales.data_ptr(), weight.offsets.data_ptr(),
                        sums.data_ptr(), y.data_ptr(), rows, groups, spec.padded)  # fmt: skip
    return y


def table_dequantize(
    plane: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, group: int, columns: int
) -> torch.Tensor:
    """The (rows, columns) float32 weight of a 4-bit table plane (padding dropped), for prompts.

    Args: a 4-bit table plane (rows, groups, padded / 2) uint8, float32 scales (rows, groups), the
    (16,) float32 table; `group` and `columns` are the unpadded group size and row width.
    """
    rows, groups, half = plane.shape
    _check(plane, plane.shape, torch.uint8)
    _check(scales, (rows, groups), torch.float32)
    _check(table, (16,), torch.float32)
    if not (groups - 1) * group < columns <= groups * group or group > 2 * half:
        raise ValueError(f"{columns} columns in groups of {group} do not fit {groups} groups of {2 * half}")
    w = torch.empty(rows, columns, dtype=torch.float32)
    load().table_dequantize(
        plane.data_ptr(), scales.data_ptr(), table.data_ptr(), w.data_ptr(), rows, groups, 2 * half, group, columns
    )
    return w
