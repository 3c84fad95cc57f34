"""One input row times a weight of 4-bit table codes (nf4, iq4nl, mxfp4, nvfp4), in C with AVX2.

Why hand-written: Inductor has no vector table lookup. Its best expression of T[q], the
multilinear polynomial of `kernels.py`, costs about six instructions per weight, so nf4 decoded
no faster than float32 (SmolLM2: 44.5 against 43.1 ms/token); a gather was six times slower
still. AVX2's `vpermps` looks up eight floats in one instruction, so two lookups and a blend decode
eight codes: about one instruction per weight.

The layout is `kernels.py`'s 4-bit plane: byte k of a group holds the codes of columns k (low
nibble) and k + padded/2 (high nibble). The source is compiled once per machine by the system C
compiler (`cc -O3 -mavx2 -mfma -fopenmp`) into ~/.cache/qconvert/kernels/ under the source's hash,
and called through ctypes on the tensors' memory. Where it cannot be built or run (no compiler, a
CPU without AVX2), `load()` returns None and the compiled Inductor kernel serves instead.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

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

/* w[r, c] = scales[r, c / group] * table[code of (r, c)], the (rows, columns) float32 weight */
void table_dequantize(const uint8_t *planes, const float *scales, const float *table, float *w,
                      int64_t rows, int64_t groups, int64_t padded, int64_t group, int64_t columns) {
    const int64_t half = padded / 2;
    const __m256 low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    const __m256i nibble = _mm256_set1_epi32(15);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *p = planes + (r * groups + g) * half;
            const __m256 scale = _mm256_set1_ps(scales[r * groups + g]);
            float decoded[padded];
            int64_t k = 0;
            for (; k + 8 <= half; k += 8) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + k)));
                _mm256_storeu_ps(decoded + k, _mm256_mul_ps(scale, lookup(_mm256_and_si256(v, nibble), low, high)));
                _mm256_storeu_ps(decoded + half + k, _mm256_mul_ps(scale, lookup(_mm256_srli_epi32(v, 4), low, high)));
            }
            for (; k < half; k++) {
                decoded[k] = scales[r * groups + g] * table[p[k] & 15];
                decoded[half + k] = scales[r * groups + g] * table[p[k] >> 4];
            }
            int64_t start = g * group, count = columns - start < group ? columns - start : group;
            for (int64_t c = 0; c < count; c++) w[r * columns + start + c] = decoded[c];
        }
    }
}
"""
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot be built or run here."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    digest = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qconvert" / "kernels"
    library = folder / f"table_gemv-{digest}.so"
    try:
        if not library.exists():
            _build(library)
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.table_gemv.restype = lib.table_dequantize.restype = None
    lib.table_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.table_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    return lib


def _build(library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        source, built = Path(scratch) / "table_gemv.c", Path(scratch) / library.name
        source.write_text(SOURCE)
        subprocess.run(["cc", *FLAGS, str(source), "-o", str(built)], check=True, capture_output=True, timeout=120)
        built.replace(library)  # whole or not at all: a concurrent build renames the same bytes


def table_gemv(x: torch.Tensor, plane: torch.Tensor, scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """y = Ŵ x for one row.

    Args:
        x: (groups, padded) float32, contiguous: the input grouped as the plane is (`kernels._grouped`).
        plane: (rows, groups, padded / 2) uint8, contiguous: 4-bit table codes.
        scales: (rows, groups) float32, contiguous: effective scales.
        table: (16,) float32: what each code stands for.

    Returns:
        (rows,) float32.
    """
    rows, groups, half = plane.shape
    y = torch.empty(rows, dtype=torch.float32)
    load().table_gemv(
        x.data_ptr(), plane.data_ptr(), scales.data_ptr(), table.data_ptr(), y.data_ptr(), rows, groups, 2 * half
    )
    return y


def table_dequantize(
    plane: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, group: int, columns: int
) -> torch.Tensor:
    """The (rows, columns) float32 weight of a 4-bit table plane (padding dropped), for prompts.

    Args are as for `table_gemv`; `group` and `columns` are the unpadded group size and row width.
    """
    rows, groups, half = plane.shape
    w = torch.empty(rows, columns, dtype=torch.float32)
    load().table_dequantize(
        plane.data_ptr(), scales.data_ptr(), table.data_ptr(), w.data_ptr(), rows, groups, 2 * half, group, columns
    )
    return w
