"""Round-to-nearest on the integer grid in C: each group's range, the codes, and the relative error.

Why hand-written: torch does each step as its own pass over float32 copies of the weight (a copy
to float32, amin, amax, a multiply, round, clamp, add, a cast to uint8; then, for the error, a
dequantized copy and a subtraction in float64), about 1.2 s of one core on a 730M-parameter Llama.
Here each step is one pass that reads the bfloat16 or float32 weight where it lies, eight weights at
a time (AVX2), which makes the round-to-nearest conversion of that model as fast as llama.cpp's.

The results are bit-identical to `rtn.py`'s torch code, which is what runs where this cannot
(no C compiler, no AVX2, float16 or non-contiguous weights): the same float32 operations in the same
order, rounding half to even (`rint`, torch.round's rule), and contraction into fused multiply-adds
turned off. Only the error sums add in another order (per row, then rows in order, in float64);
they agree with `base.relative_error` to its six reported digits.

Kernels, for a weight (rows, columns) in groups of `group` columns (the last group may be partial):
- `scales`: each group's stored scale, its inverse and its zero point from its range, the steps of
  `rtn._rtn_int` and `grids.stored_scales` (bfloat16 rounding to nearest even, float16 by F16C).
- `ranges`: each group's min and max, zero included for a partial group (the zero padding of
  `rtn.group_view`); returns 1 if any weight is NaN or infinite.
- `codes`: code = clamp(rint(w · inverse[r, g]), −half, half − 1) + half (symmetric), or
  clamp(rint(w · inverse[r, g]) + zero[r, g], 0, 2**bits − 1) (asymmetric), as uint8.
- `error`: Σ (w − (code − zero) · scale)² and Σ w² in float64 (`base.relative_error`).
"""

import ctypes
from functools import cache

import torch

from qconvert import native
from qconvert.quantizers.grids import SCALE_TOLERANCE

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline float load1_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float x;
    __builtin_memcpy(&x, &bits, 4);
    return x;
}
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float load1_f32(const float *p) { return *p; }

static inline float hmin(__m256 v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
}
static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

#define KERNELS(SUFFIX, T)                                                                                 \
int ranges_##SUFFIX(const T *w, float *low, float *high, int64_t rows, int64_t columns, int64_t group,      \
                    int threads) {                                                                         \
    const int64_t groups = (columns + group - 1) / group;                                                  \
    const __m256 limit = _mm256_set1_ps(3.4028234663852886e38f), sign = _mm256_set1_ps(-0.0f);            \
    int bad = 0;                                                                                           \
    _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(|: bad)")                    \
    for (int64_t r = 0; r < rows; r++) {                                                                   \
        const T *row = w + r * columns;                                                                    \
        __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));                                        \
        int tail_bad = 0;                                                                                  \
        for (int64_t g = 0; g < groups; g++) {                                                             \
            const int64_t start = g * group, end = start + group < columns ? start + group : columns;      \
            __m256 lo = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(-INFINITY);                          \
            int64_t c = start;                                                                             \
            for (; c + 8 <= end; c += 8) {                                                                 \
                __m256 x = load8_##SUFFIX(row + c);                                                        \
                lo = _mm256_min_ps(lo, x);                                                                 \
                hi = _mm256_max_ps(hi, x);                                                                 \
                finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_andnot_ps(sign, x), limit, _CMP_LE_OQ)); \
            }                                                                                              \
            float l = hmin(lo), h = hmax(hi);                                                              \
            for (; c < end; c++) {                                                                         \
                float x = load1_##SUFFIX(row + c);                                                         \
                l = x < l ? x : l;                                                                         \
                h = x > h ? x : h;                                                                         \
                tail_bad |= !(fabsf(x) <= 3.4028234663852886e38f);                                         \
            }                                                                                              \
            if (end - start < group) { l = l < 0.0f ? l : 0.0f; h = h > 0.0f ? h : 0.0f; }                 \
            low[r * groups + g] = l;                                                                       \
            high[r * groups + g] = h;                                                                      \
        }                                                                                                  \
        bad |= tail_bad | (_mm256_movemask_ps(finite) != 0xFF);                                            \
    }                                                                                                      \
    return bad;                                                                                            \
}                                                                                                          \
                                                                                                           \
void codes_##SUFFIX(const T *w, const float *inverse, const float *zeros, uint8_t *codes, int64_t rows,     \
                    int64_t columns, int64_t group, int bits, int threads) {                               \
    const int64_t groups = (columns + group - 1) / group;                                                  \
    const float half = (float)(1 << (bits - 1)), top = (float)((1 << bits) - 1);                          \
    const float low = zeros ? 0.0f : -half, high = zeros ? top : half - 1.0f;                              \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                      \
    for (int64_t r = 0; r < rows; r++) {                                                                   \
        const T *row = w + r * columns;                                                                    \
        uint8_t *out = codes + r * columns;                                                                \
        for (int64_t g = 0; g < groups; g++) {                                                             \
            const int64_t start = g * group, end = start + group < columns ? start + group : columns;      \
            const float inv = inverse[r * groups + g];                                                     \
            /* symmetric: clamp, then add half; asymmetric: add the zero point, then clamp */              \
            const float before = zeros ? zeros[r * groups + g] : 0.0f, after = zeros ? 0.0f : half;        \
            const __m256 vinv = _mm256_set1_ps(inv), vbefore = _mm256_set1_ps(before);                     \
            const __m256 vafter = _mm256_set1_ps(after), vlow = _mm256_set1_ps(low);                       \
            const __m256 vhigh = _mm256_set1_ps(high);                                                     \
            int64_t c = start;                                                                             \
            for (; c + 8 <= end; c += 8) {                                                                 \
                __m256 q = _mm256_round_ps(_mm256_mul_ps(load8_##SUFFIX(row + c), vinv),                   \
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                 \
                q = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vbefore), vlow), vhigh), vafter); \
                __m128i i32lo = _mm256_castsi256_si128(_mm256_cvtps_epi32(q));                            \
                __m128i i32hi = _mm256_extractf128_si256(_mm256_cvtps_epi32(q), 1);                       \
                __m128i i16 = _mm_packus_epi32(i32lo, i32hi);                                             \
                _mm_storel_epi64((__m128i *)(out + c), _mm_packus_epi16(i16, i16));                       \
            }                                                                                              \
            for (; c < end; c++) {                                                                         \
                float q = rintf(load1_##SUFFIX(row + c) * inv) + before;                                   \
                q = q < low ? low : (q > high ? high : q);                                                 \
                out[c] = (uint8_t)(q + after);                                                             \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
}                                                                                                          \
                                                                                                           \
void error_##SUFFIX(const T *w, const uint8_t *codes, const float *scales, const float *zeros,             \
                    double *row_sums, int64_t rows, int64_t columns, int64_t group, int threads) {          \
    const int64_t groups = (columns + group - 1) / group;                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                      \
    for (int64_t r = 0; r < rows; r++) {                                                                   \
        const T *row = w + r * columns;                                                                    \
        const uint8_t *in = codes + r * columns;                                                           \
        __m256d error = _mm256_setzero_pd(), norm = _mm256_setzero_pd();                                  \
        double error1 = 0.0, norm1 = 0.0;                                                                  \
        for (int64_t g = 0; g < groups; g++) {                                                             \
            const int64_t start = g * group, end = start + group < columns ? start + group : columns;      \
            const float scale = scales[r * groups + g], zero = zeros[r * groups + g];                      \
            const __m256 vscale = _mm256_set1_ps(scale), vzero = _mm256_set1_ps(zero);                     \
            int64_t c = start;                                                                             \
            for (; c + 8 <= end; c += 8) {                                                                 \
                __m256 x = load8_##SUFFIX(row + c);                                                        \
                __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(in + c)))); \
                __m256 value = _mm256_mul_ps(_mm256_sub_ps(code, vzero), vscale);                         \
                __m256d x0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x));                                  \
                __m256d x1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));                                \
                __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(value)), x0);           \
                __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(value, 1)), x1);         \
                error = _mm256_add_pd(error, _mm256_add_pd(_mm256_mul_pd(d0, d0), _mm256_mul_pd(d1, d1))); \
                norm = _mm256_add_pd(norm, _mm256_add_pd(_mm256_mul_pd(x0, x0), _mm256_mul_pd(x1, x1)));  \
            }                                                                                              \
            for (; c < end; c++) {                                                                         \
                double x = load1_##SUFFIX(row + c);                                                        \
                double d = (double)(((float)in[c] - zero) * scale) - x;                                    \
                error1 += d * d;                                                                           \
                norm1 += x * x;                                                                            \
            }                                                                                              \
        }                                                                                                  \
        double e[4], n[4];                                                                                 \
        _mm256_storeu_pd(e, error);                                                                        \
        _mm256_storeu_pd(n, norm);                                                                         \
        row_sums[2 * r] = ((e[0] + e[1]) + (e[2] + e[3])) + error1;                                        \
        row_sums[2 * r + 1] = ((n[0] + n[1]) + (n[2] + n[3])) + norm1;                                     \
    }                                                                                                      \
}

KERNELS(bf16, uint16_t)
KERNELS(f32, float)

/* float32 -> bfloat16 bits, rounding to nearest even (torch's rule; NaN never reaches here) */
static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    __builtin_memcpy(&bits, &x, 4);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
static inline float from_bf16(uint16_t h) { return load1_bf16(&h); }

/* Each group's stored scale (float16 or bfloat16 bits), its float32 inverse and (asymmetric) zero
   point, from its range [low, high] as `grids.stored_scales` and `rtn._rtn_int` make them. Returns 1
   when some scale does not fit the dtype; the caller then raises torch's own error. */
int scales(const float *low, const float *high, int64_t n, int bits, int symmetric, int bfloat16,
           float tolerance, uint16_t *stored, float *inverse, float *zeros) {
    const float half = (float)(1 << (bits - 1)), top = (float)((1 << bits) - 1);
    const float tiny = bfloat16 ? 1.1754943508222875e-38f : 6.103515625e-05f;
    const uint16_t tiny_bits = bfloat16 ? 0x0080 : 0x0400;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float l = low[i], h = high[i], raw;
        if (symmetric) {
            raw = (-l > h ? l : h) / -half;
        } else {
            l = l < 0.0f ? l : 0.0f;
            h = h > 0.0f ? h : 0.0f;
            raw = (h - l) / top;
        }
        float magnitude = fabsf(raw);
        uint16_t s = bfloat16 ? to_bf16(magnitude) : _cvtss_sh(magnitude, _MM_FROUND_TO_NEAREST_INT);
        float back = bfloat16 ? from_bf16(s) : _cvtsh_ss(s);
        if (back < magnitude && magnitude < tiny) { /* among the subnormals: round up */
            s += 1;
            back = bfloat16 ? from_bf16(s) : _cvtsh_ss(s);
        }
        int drifts = magnitude > 0.0f && fabsf(back - magnitude) > tolerance * magnitude;
        if (!(magnitude <= 3.4028234663852886e38f) || drifts) {
            bad = 1;
            continue;
        }
        if (!(magnitude > 0.0f)) { s = tiny_bits; back = tiny; }
        if (raw < 0.0f) { s |= 0x8000; back = -back; }
        stored[i] = s;
        inverse[i] = 1.0f / back;
        if (!symmetric) {
            float z = rintf(-(l * inverse[i]));
            zeros[i] = z < 0.0f ? 0.0f : (z > top ? top : z);
        }
    }
    return bad;
}
"""
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
SUFFIXES = {torch.bfloat16: "bf16", torch.float32: "f32"}


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or run here (`native.load`)."""
    lib = native.load("rtn_kernel", SOURCE, FLAGS)
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in SUFFIXES.values():
        getattr(lib, f"ranges_{suffix}").argtypes = [p, p, p, i64, i64, i64, i32]
        getattr(lib, f"ranges_{suffix}").restype = ctypes.c_int
        getattr(lib, f"codes_{suffix}").argtypes = [p, p, p, p, i64, i64, i64, i32, i32]
        getattr(lib, f"codes_{suffix}").restype = None
        getattr(lib, f"error_{suffix}").argtypes = [p, p, p, p, p, i64, i64, i64, i32]
        getattr(lib, f"error_{suffix}").restype = None
    lib.scales.argtypes = [p, p, i64, i32, i32, i32, ctypes.c_float, p, p, p]
    lib.scales.restype = ctypes.c_int
    return lib


def applies(weight: torch.Tensor) -> bool:
    """Whether the C kernels take this weight: 2-D, contiguous bfloat16 or float32 in CPU memory, on a machine that
    built them."""
    return (
        weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.dtype in SUFFIXES
        and weight.is_contiguous()
        and load() is not None
    )


def group_ranges(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Each group's (min, max) as float32 (rows, groups), zero included in a partial last group, and
    whether every weight is finite. `weight` must pass `applies`."""
    rows, columns = weight.shape
    groups = -(-columns // group)
    low, high = torch.empty(rows, groups), torch.empty(rows, groups)
    bad = getattr(load(), f"ranges_{SUFFIXES[weight.dtype]}")(
        weight.data_ptr(), low.data_ptr(), high.data_ptr(), rows, columns, group, torch.get_num_threads()
    )
    return low, high, not bad


def grid(
    low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(stored scales in `scale_dtype`, float32 inverses, float32 zero points or None when symmetric), all
    (rows, groups), for groups spanning the float32 ranges [low, high] (unclamped) on the integer grid:
    the values of `rtn.range_scales` and `rtn._rtn_int`. None when some scale does not fit `scale_dtype`
    (`grids.stored_scales` then raises its error)."""
    native.check_tensor(low, low.shape, torch.float32)
    native.check_tensor(high, low.shape, torch.float32)
    stored = torch.empty(low.shape, dtype=torch.int16)
    inverse = torch.empty(low.shape)
    zeros = None if symmetric else torch.empty(low.shape)
    bad = load().scales(
        low.data_ptr(),
        high.data_ptr(),
        low.numel(),
        bits,
        symmetric,
        scale_dtype == torch.bfloat16,
        SCALE_TOLERANCE,
        stored.data_ptr(),
        inverse.data_ptr(),
        None if zeros is None else zeros.data_ptr(),
    )
    return None if bad else (stored.view(scale_dtype), inverse, zeros)


def int_codes(
    weight: torch.Tensor, inverse: torch.Tensor, zeros: torch.Tensor | None, group: int, bits: int
) -> torch.Tensor:
    """uint8 codes (rows, columns) of `weight` on the integer grid with float32 `inverse` scales (rows,
    groups) and float32 `zeros` (rows, groups), or None for the symmetric grid around 2**(bits-1)."""
    rows, columns = weight.shape
    groups = -(-columns // group)
    native.check_tensor(inverse, (rows, groups), torch.float32)
    if zeros is not None:
        native.check_tensor(zeros, (rows, groups), torch.float32)
    codes = torch.empty(rows, columns, dtype=torch.uint8)
    getattr(load(), f"codes_{SUFFIXES[weight.dtype]}")(
        weight.data_ptr(),
        inverse.data_ptr(),
        None if zeros is None else zeros.data_ptr(),
        codes.data_ptr(),
        rows,
        columns,
        group,
        bits,
        torch.get_num_threads(),
    )
    return codes


def error_sums(
    weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
) -> tuple[float, float]:
    """(Σ (w − (code − zero) · scale)², Σ w²) in float64, for float32 `scales` and `zeros` (rows, groups)."""
    rows, columns = weight.shape
    groups = -(-columns // group)
    native.check_tensor(codes, (rows, columns), torch.uint8)
    native.check_tensor(scales, (rows, groups), torch.float32)
    native.check_tensor(zeros, (rows, groups), torch.float32)
    sums = torch.empty(rows, 2, dtype=torch.float64)
    getattr(load(), f"error_{SUFFIXES[weight.dtype]}")(
        weight.data_ptr(),
        codes.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        sums.data_ptr(),
        rows,
        columns,
        group,
        torch.get_num_threads(),
    )
    error, norm = sums.sum(0).tolist()  # rows in order: the same total for any thread count
    return error, norm
