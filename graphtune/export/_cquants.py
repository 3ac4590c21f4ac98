"""The C block quantizers (Q8_0, Q4_K, Q5_K, Q6_K): compiled on first use, loaded with ctypes.

``quants.quantize`` uses them on the CPU when a C compiler is found (``$CC``, ``cc``, ``gcc`` or
``clang``); otherwise, on CUDA, or with ``GRAPHTUNE_QUANT_BACKEND=torch`` it runs its torch
quantizers. Both are byte-identical to ggml's reference quantizers; the C ones are ~15x faster
than the torch ones on a CPU (and ~6x faster than ggml's own scalar reference code), because they
run the 8 (Q6_K: 16) groups of a super-block in the lanes of one vector.

The shared library is built once per machine into ``$GRAPHTUNE_CACHE`` (default
``~/.cache/graphtune``)``/cquants/<hash>/`` -- the hash covers the source, the compiler, the flags
and the CPU's feature flags (``-march=native``) -- and checked against the torch quantizers on a
few blocks before it is trusted (a compiler that contracts to FMA or assumes fast math would fail
that check; the torch path is used then, with a warning). Builds are atomic (temporary name, then
rename), so concurrent processes may race safely.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("graphtune.export")

ABI_VERSION = 1
# ggml type ids the C library implements
C_TYPES = (8, 12, 13, 14)  # Q8_0, Q4_K, Q5_K, Q6_K
SRC_F32, SRC_F16, SRC_BF16 = 0, 1, 2

# no -ffast-math, and no contraction of a*b+c into an FMA: every float operation rounds like ggml's
_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing"]
_ARCH_FLAGS = (["-march=native"], [])

C_SOURCE = r"""/* graphtune GGUF block quantizers in C (Q8_0, Q4_K, Q5_K, Q6_K), byte-identical to ggml's
 * quantize_row_*_ref: the same float32 operations in the same order, no FMA contraction
 * (built with -ffp-contract=off, never -ffast-math).
 *
 * Written for graphtune from the published GGUF formats and the reference algorithms (the
 * make_qkx2 / make_qx scale searches); the speed comes from running the 8 groups of a K-quant
 * super-block (16 for Q6_K) in the 8 lanes of a vector (GCC/Clang vector extensions), where ggml's
 * reference runs one group at a time. Inputs are float32, float16 or bfloat16 (converted per
 * block, exactly), so a checkpoint's tensor needs no float32 copy.
 *
 * gt_quantize returns -1 when every block was written, else the index of the first block with a
 * non-finite value (nothing is guaranteed about the output then).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

enum { SRC_F32 = 0, SRC_F16 = 1, SRC_BF16 = 2 };
enum { GT_Q8_0 = 8, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14 };

#define GROUP_MAX_EPS 1e-15f

static inline v8f vs(float a) { return (v8f){a, a, a, a, a, a, a, a}; }
static inline v8i is(int32_t a) { return (v8i){a, a, a, a, a, a, a, a}; }
static inline v8f vsel(v8i m, v8f a, v8f b) { return (v8f)(((v8i)a & m) | ((v8i)b & ~m)); }
static inline v8i isel(v8i m, v8i a, v8i b) { return (a & m) | (b & ~m); }
static inline v8f vabs(v8f a) { return (v8f)((v8i)a & is(0x7fffffff)); }
static inline v8f vzero(void) { return vs(0.0f); }

/* ggml's nearest_int bit for bit (also outside its asserted range): bits of (x + 1.5*2^23) */
static inline int nearest_int(float f) {
    float val = f + 12582912.f;
    int32_t i;
    memcpy(&i, &val, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}
static inline v8i vnearest(v8f f) {
    v8i i = (v8i)(f + vs(12582912.f));
    return (i & is(0x007fffff)) - is(0x00400000);
}
static inline v8f vclampi(v8i l, int lo, int hi) {  /* MAX(lo, MIN(hi, l)) as float */
    l = isel(l < is(hi), l, is(hi));
    l = isel(l > is(lo), l, is(lo));
    return __builtin_convertvector(l, v8f);
}
/* MAX(lo, MIN(hi, nearest_int(v))) as float, in the scale searches. With AVX: round to nearest
 * even + float min/max, the same values wherever ggml's nearest_int is defined (|v| <= 2^22, which
 * it asserts); a handful of instructions less in the innermost loops. */
#if defined(__AVX__)
#include <immintrin.h>
static inline v8f vround_clamp(v8f v, float lo, float hi) {
    __m256 r = _mm256_round_ps((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(r, _mm256_set1_ps(hi));
    return (v8f)_mm256_max_ps(r, _mm256_set1_ps(lo));
}
#else
static inline v8f vround_clamp(v8f v, float lo, float hi) { return vclampi(vnearest(v), (int)lo, (int)hi); }
#endif

/* IEEE half <-> float, round to nearest even (what ggml's GGML_FP32_TO_FP16 gives) */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  /* NaN stays NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                         /* >= 65520: inf */
    if (ax < 0x38800000u) {                                                            /* half subnormal */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));               /* a * 2^24, exact */
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u);  /* rebias the exponent (-112 << 23), round half to even */
    return (uint16_t)(sign | (ax >> 13));
}
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 0) {
        float r = (float)m * 0x1p-24f;
        return sign ? -r : r;
    }
    bits = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    float r;
    memcpy(&r, &bits, 4);
    return r;
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

/* n values of the source (any of the three types) as float32; 0 when one is not finite */
static inline int load(const void *src, int type, int64_t start, int n, float *out) {
    uint32_t bad = 0;
    if (type == SRC_F32) {
        const float *p = (const float *)src + start;
        memcpy(out, p, (size_t)n * 4);
    } else if (type == SRC_BF16) {
        const uint16_t *p = (const uint16_t *)src + start;
        for (int i = 0; i < n; ++i) {
            uint32_t b = (uint32_t)p[i] << 16;
            memcpy(out + i, &b, 4);
        }
    } else {
        const uint16_t *p = (const uint16_t *)src + start;
        for (int i = 0; i < n; ++i) out[i] = f16_to_f32(p[i]);
    }
    for (int i = 0; i < n; ++i) {
        uint32_t b;
        memcpy(&b, out + i, 4);
        bad |= ((b & 0x7f800000u) == 0x7f800000u);
    }
    return !bad;
}

/* ---------------------------------------------------------------------------------------- Q8_0 */
typedef int8_t v8c __attribute__((vector_size(8)));
static void q8_0_block(const float *x, uint8_t *y) {
    v8f v[4], m;
    memcpy(v, x, sizeof v);
    m = vabs(v[0]);
    for (int k = 1; k < 4; ++k) {
        v8f a = vabs(v[k]);
        m = vsel(a > m, a, m);
    }
    float amax = 0.0f;  /* the largest |x| (max is exact in any order) */
    for (int k = 0; k < 8; ++k) amax = amax > m[k] ? amax : m[k];
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    put16(y, f32_to_f16(d));
    /* roundf(v) == trunc(v + copysign(0.5 - 2^-25, v)) for every float32 */
    const v8f half = vs(0.49999997f), vid = vs(id);
    for (int k = 0; k < 4; ++k) {
        v8f t = v[k] * vid;
        v8f h = (v8f)(((v8i)half) | ((v8i)t & is((int32_t)0x80000000)));
        v8c q = __builtin_convertvector(__builtin_convertvector(t + h, v8i), v8c);
        memcpy(y + 2 + 8 * k, &q, 8);
    }
}

/* ------------------------------------------------------------------------------- Q4_K / Q5_K */
/* make_qkx2_quants for the 8 groups of a super-block at once (lane j = group j); X, W: [32].
 * Returns the scale per lane, the min (the_min = -min), and the (iscale, min) of the winning
 * candidate so that its levels can be recomputed where they are needed. */
static void qkx2_8(const v8f *X, const v8f *W, int nmax, float rmin, float rdelta, int nstep, v8f *scale_out,
                   v8f *the_min_out, v8f *best_is_out, v8f *best_mn_out, v8i *degen_out) {
    v8f mn = X[0], mx = X[0], sum_w = W[0], sum_x = sum_w * X[0];
    for (int i = 1; i < 32; ++i) {
        mn = vsel(X[i] < mn, X[i], mn);
        mx = vsel(X[i] > mx, X[i], mx);
        sum_w += W[i];
        sum_x += W[i] * X[i];
    }
    mn = vsel(mn > vzero(), vzero(), mn);
    const v8f mn0 = mn;
    const v8i degen = mx == mn;
    v8f iscale = vs((float)nmax) / (mx - mn);
    v8f scale = vs(1.0f) / iscale;
    v8f best_error = vzero();
    for (int i = 0; i < 32; ++i) {
        v8f l = vround_clamp(iscale * (X[i] - mn), 0, nmax);
        v8f diff = scale * l + mn - X[i];
        diff = diff * diff;
        best_error += W[i] * diff;
    }
    v8f best_is = iscale, best_mn = mn;
    v8f La[32];
    for (int step = 0; step <= nstep; ++step) {
        const float c = rmin + rdelta * (float)step + (float)nmax;
        iscale = vs(c) / (mx - mn);
        v8f sum_l = vzero(), sum_l2 = vzero(), sum_xl = vzero();
        for (int i = 0; i < 32; ++i) {
            v8f l = vround_clamp(iscale * (X[i] - mn), 0, nmax);
            La[i] = l;
            v8f wl = W[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * X[i];
        }
        v8f D = sum_w * sum_l2 - sum_l * sum_l;
        v8f this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        v8f this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        v8i pos = this_min > vzero();
        this_min = vsel(pos, vzero(), this_min);
        this_scale = vsel(pos, sum_xl / sum_l2, this_scale);
        v8f cur_error = vzero();
        for (int i = 0; i < 32; ++i) {
            v8f diff = this_scale * La[i] + this_min - X[i];
            diff = diff * diff;
            cur_error += W[i] * diff;
        }
        v8i better = (D > vzero()) & (cur_error < best_error);
        best_is = vsel(better, iscale, best_is);
        best_mn = vsel(better, mn, best_mn);
        best_error = vsel(better, cur_error, best_error);
        scale = vsel(better, this_scale, scale);
        mn = vsel(better, this_min, mn);
    }
    *scale_out = vsel(degen, vzero(), scale);
    *the_min_out = -vsel(degen, mn0, mn);
    *best_is_out = best_is;
    *best_mn_out = best_mn;
    *degen_out = degen;
}

static void q45_k_block(const float *x, uint8_t *y, int five) {
    const int nmax = five ? 31 : 15;
    v8f X[32], W[32];
    float xt[32][8] __attribute__((aligned(32)));
    for (int j = 0; j < 8; ++j)
        for (int i = 0; i < 32; ++i) xt[i][j] = x[32 * j + i];
    memcpy(X, xt, sizeof xt);
    v8f sum_x2 = vzero();
    for (int i = 0; i < 32; ++i) sum_x2 += X[i] * X[i];
    v8f q = sum_x2 / vs(32.0f), av;
    for (int j = 0; j < 8; ++j) av[j] = sqrtf(q[j]);
    for (int i = 0; i < 32; ++i) W[i] = av + vabs(X[i]);
    v8f sc, mi, bis, bmn;
    v8i degen;
    if (five)
        qkx2_8(X, W, 31, -0.5f, 0.1f, 15, &sc, &mi, &bis, &bmn, &degen);
    else
        qkx2_8(X, W, 15, -1.0f, 0.1f, 20, &sc, &mi, &bis, &bmn, &degen);

    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        if (sc[j] > max_scale) max_scale = sc[j];
        if (mi[j] > max_min) max_min = mi[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    uint8_t *scales = y + 4;
    for (int j = 0; j < 8; ++j) {
        uint8_t a = (uint8_t)nearest_int(inv_scale * sc[j]);
        uint8_t b = (uint8_t)nearest_int(inv_min * mi[j]);
        ls[j] = a < 63 ? a : 63;
        lm[j] = b < 63 ? b : 63;
    }
    for (int j = 0; j < 4; ++j) {
        scales[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        scales[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        scales[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    const uint16_t dh = f32_to_f16(max_scale / 63.f), dmh = f32_to_f16(max_min / 63.f);
    put16(y, dh);
    put16(y + 2, dmh);
    const float dd = f16_to_f32(dh), ddm = f16_to_f32(dmh);
    uint8_t L[256];
    for (int j = 0; j < 8; ++j) {
        const float *xj = x + 32 * j;
        const float d = dd * ls[j];
        if (!d) {  /* the levels of the scale search */
            for (int i = 0; i < 32; ++i) {
                int l = nearest_int(bis[j] * (xj[i] - bmn[j]));
                l = l < nmax ? l : nmax;
                L[32 * j + i] = degen[j] ? 0 : (uint8_t)(l > 0 ? l : 0);
            }
            continue;
        }
        const float dm = ddm * lm[j];
        for (int i = 0; i < 32; ++i) {
            int l = nearest_int((xj[i] + dm) / d);
            l = l < nmax ? l : nmax;
            L[32 * j + i] = (uint8_t)(l > 0 ? l : 0);
        }
    }
    uint8_t *qs = y + (five ? 48 : 16);
    if (five) {
        uint8_t *qh = y + 16;
        memset(qh, 0, 32);
        for (int n = 0, k = 0; n < 256; n += 64, ++k) {
            for (int j = 0; j < 32; ++j) {
                int l1 = L[n + j], l2 = L[n + j + 32];
                if (l1 > 15) { l1 -= 16; qh[j] |= (uint8_t)(1u << (2 * k)); }
                if (l2 > 15) { l2 -= 16; qh[j] |= (uint8_t)(2u << (2 * k)); }
                qs[32 * k + j] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    } else {
        for (int n = 0, k = 0; n < 256; n += 64, ++k)
            for (int j = 0; j < 32; ++j) qs[32 * k + j] = (uint8_t)(L[n + j] | (L[n + j + 32] << 4));
    }
}

/* ------------------------------------------------------------------------------------- Q6_K */
/* make_qx_quants(16, 32, x, L, rmse_type=1, NULL) for 8 groups of 16 (lane j = group j) */
static void qx6_8(const v8f *X, v8f *scale_out, v8f *best_is_out, v8i *allzero_out) {
    const int nmax = 32;
    v8f amax = vzero(), mx = vzero();
    for (int i = 0; i < 16; ++i) {
        v8f ax = vabs(X[i]);
        v8i m = ax > amax;
        amax = vsel(m, ax, amax);
        mx = vsel(m, X[i], mx);
    }
    const v8i allzero = amax < vs(GROUP_MAX_EPS);
    v8f Wt[16], WX[16];
    for (int i = 0; i < 16; ++i) {
        Wt[i] = X[i] * X[i];
        WX[i] = Wt[i] * X[i];
    }
    v8f iscale = vs((float)-nmax) / mx;
    v8f sumlx = vzero(), suml2 = vzero();
    for (int i = 0; i < 16; ++i) {
        v8f l = vround_clamp(iscale * X[i], -nmax, nmax - 1);
        sumlx += WX[i] * l;
        suml2 += Wt[i] * l * l;
    }
    v8f scale = vsel(suml2 != vzero(), sumlx / suml2, vzero());
    v8f best = scale * sumlx, best_is = iscale;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        const float c = (float)nmax + 0.1f * (float)step;
        iscale = vs(-c) / mx;
        sumlx = suml2 = vzero();
        for (int i = 0; i < 16; ++i) {
            v8f l = vround_clamp(iscale * X[i], -nmax, nmax - 1);
            sumlx += WX[i] * l;
            suml2 += Wt[i] * l * l;
        }
        v8i better = (suml2 > vzero()) & (sumlx * sumlx > best * suml2);
        best_is = vsel(better, iscale, best_is);
        scale = vsel(better, sumlx / suml2, scale);
        best = vsel(better, scale * sumlx, best);
    }
    *scale_out = vsel(allzero, vzero(), scale);
    *best_is_out = best_is;
    *allzero_out = allzero;
}

static void q6_k_block(const float *x, uint8_t *y) {
    float scales[16], bis[16];
    int allzero[16];
    for (int h = 0; h < 2; ++h) {
        v8f X[16];
        float xt[16][8] __attribute__((aligned(32)));
        for (int j = 0; j < 8; ++j)
            for (int i = 0; i < 16; ++i) xt[i][j] = x[16 * (8 * h + j) + i];
        memcpy(X, xt, sizeof xt);
        v8f sc, bi;
        v8i az;
        qx6_8(X, &sc, &bi, &az);
        for (int j = 0; j < 8; ++j) {
            scales[8 * h + j] = sc[j];
            bis[8 * h + j] = bi[j];
            allzero[8 * h + j] = az[j] != 0;
        }
    }
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float abs_scale = fabsf(scales[ib]);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scales[ib];
        }
    }
    if (max_abs_scale < GROUP_MAX_EPS) {
        memset(y, 0, 210);
        return;
    }
    const float iscale = -128.f / max_scale;
    const uint16_t dh = f32_to_f16(1 / iscale);
    int8_t *sc = (int8_t *)(y + 192);
    for (int ib = 0; ib < 16; ++ib) {
        int v = nearest_int(iscale * scales[ib]);
        sc[ib] = (int8_t)(v < 127 ? v : 127);
    }
    put16(y + 208, dh);
    const float dd = f16_to_f32(dh);
    uint8_t L[256];
    for (int j = 0; j < 16; ++j) {
        const float *xj = x + 16 * j;
        const float d = dd * sc[j];
        if (!d) {  /* the levels of the scale search */
            for (int i = 0; i < 16; ++i) {
                int l = nearest_int(bis[j] * xj[i]);
                l = l < 31 ? l : 31;
                l = l > -32 ? l : -32;
                L[16 * j + i] = allzero[j] ? 0 : (uint8_t)(l + 32);
            }
            continue;
        }
        for (int i = 0; i < 16; ++i) {
            int l = nearest_int(xj[i] / d);
            l = l < 31 ? l : 31;
            l = l > -32 ? l : -32;
            L[16 * j + i] = (uint8_t)(l + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < 256; j += 128) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t q1 = L[j + l + 0] & 0xF, q2 = L[j + l + 32] & 0xF;
            const uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
            ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
            ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                              ((L[j + l + 96] >> 4) << 6));
        }
        ql += 64;
        qh += 32;
    }
}

/* ------------------------------------------------------------------------------------ entry */
int gt_block_size(int qtype) { return qtype == GT_Q8_0 ? 32 : 256; }
int gt_type_size(int qtype) {
    switch (qtype) {
        case GT_Q8_0: return 34;
        case GT_Q4_K: return 144;
        case GT_Q5_K: return 176;
        case GT_Q6_K: return 210;
        default: return 0;
    }
}

/* Quantize blocks [first, first + n) of src (elements block*first ...) into dst (the bytes of those
 * blocks, consecutive). -1 when all were written, else the index of the first non-finite block. */
int64_t gt_quantize(int qtype, const void *src, int src_type, uint8_t *dst, int64_t first, int64_t n) {
    const int bs = gt_block_size(qtype), ts = gt_type_size(qtype);
    if (!ts) return -2;
    float buf[256] __attribute__((aligned(32)));
    if (qtype == GT_Q8_0) {  /* 8 blocks per load */
        for (int64_t b = 0; b < n; b += 8) {
            const int m = n - b < 8 ? (int)(n - b) : 8;
            if (!load(src, src_type, (first + b) * bs, bs * m, buf)) {
                for (int k = 0; k < m; ++k)
                    if (!load(src, src_type, (first + b + k) * bs, bs, buf)) return first + b + k;
            }
            for (int k = 0; k < m; ++k) q8_0_block(buf + 32 * k, dst + (b + k) * ts);
        }
        return -1;
    }
    for (int64_t b = 0; b < n; ++b) {
        if (!load(src, src_type, (first + b) * bs, bs, buf)) return first + b;
        uint8_t *y = dst + b * ts;
        switch (qtype) {
            case GT_Q8_0: q8_0_block(buf, y); break;
            case GT_Q4_K: q45_k_block(buf, y, 0); break;
            case GT_Q5_K: q45_k_block(buf, y, 1); break;
            case GT_Q6_K: q6_k_block(buf, y); break;
        }
    }
    return -1;
}

int gt_abi_version(void) { return 1; }
"""


def _cache_root() -> Path:
    return Path(os.environ.get("GRAPHTUNE_CACHE") or Path.home() / ".cache" / "graphtune")


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compilers() -> list[str]:
    out = []
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cc) if cc else None
        if path and path not in out:
            out.append(path)
    return out


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cc


def _build(cc: str, arch: list[str]) -> Path | None:
    flags = _FLAGS + arch
    key = hashlib.sha256("\0".join([C_SOURCE, cc, _compiler_id(cc), *flags, platform.machine(), _cpu_fingerprint(),
                                     sys.platform]).encode()).hexdigest()[:20]
    d = _cache_root() / "cquants" / key
    lib = d / ("gtquants.dll" if sys.platform == "win32" else "libgtquants.so")
    if lib.exists():
        return lib
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        c_file = Path(tmp) / "gtquants.c"
        c_file.write_text(C_SOURCE)
        out = Path(tmp) / lib.name
        r = subprocess.run([cc, *flags, "-o", str(out), str(c_file), "-lm"], capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or not out.exists():
            logger.debug("graphtune C quantizers: %s %s failed: %s", cc, " ".join(flags), r.stderr[-2000:])
            return None
        os.replace(out, lib)
    return lib


_lock = threading.Lock()
_state: dict[str, object] = {}


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.gt_abi_version.restype = ctypes.c_int
    if lib.gt_abi_version() != ABI_VERSION:
        return None
    lib.gt_quantize.restype = ctypes.c_int64
    lib.gt_quantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                ctypes.c_int64]
    return lib


def library():
    """The loaded, self-checked C library, or None (no compiler, build failed, check failed)."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, "no C compiler found ($CC, cc, gcc, clang)"
        for cc in _compilers():
            for arch in _ARCH_FLAGS:
                try:
                    path = _build(cc, arch)
                except (OSError, subprocess.SubprocessError) as e:
                    why = f"{cc}: {e}"
                    continue
                if path is None:
                    why = f"{cc} could not build them"
                    continue
                cand = _load(path)
                if cand is None:
                    why = f"{path}: ABI mismatch"
                    continue
                ok = path.with_suffix(".checked")
                if not ok.exists():
                    problem = _self_check(cand)
                    if problem:
                        why = f"{path} disagrees with the torch quantizers ({problem})"
                        logger.warning("graphtune C quantizers not used: %s", why)
                        continue
                    ok.write_text("ok")
                lib = cand
                break
            if lib is not None:
                break
        if lib is None:
            logger.info("graphtune C quantizers unavailable (%s); using the torch quantizers", why)
        _state["lib"] = lib
        _state["why"] = why if lib is None else None
        return lib


def unavailable_reason() -> str | None:
    library()
    return _state.get("why")  # type: ignore[return-value]


def quantize_blocks(lib, qtype: int, src_ptr: int, src_type: int, dst_ptr: int, first: int, n: int) -> int:
    """Blocks [first, first+n) of the source into dst (ctypes releases the GIL meanwhile)."""
    return int(lib.gt_quantize(int(qtype), src_ptr, int(src_type), dst_ptr, int(first), int(n)))


def _self_check(lib) -> str | None:
    """A few blocks of awkward data through C and through the torch quantizers: identical bytes?"""
    import numpy as np

    from graphtune.export import quants as Q

    rng = np.random.default_rng(1234)
    x = (rng.standard_t(3, (6, 512)) * 0.02).astype(np.float32)
    x[0, :64] = 0.0
    x[0, 64:96] = 1.5
    x[1, :256] *= 1e-6
    x[2, :32] = np.tile(np.float32([0.5, -0.5]), 16)
    x[3, ::3] = 0.0
    x[4] = np.abs(x[4]) + 0.3
    x[5, :256] = rng.integers(-3, 4, 256)
    for qtype in C_TYPES:
        ref = Q.quantize(x, qtype, backend="torch")
        got = np.empty_like(ref)
        block = 32 if qtype == 8 else 256
        rc = quantize_blocks(lib, qtype, x.ctypes.data, SRC_F32, got.ctypes.data, 0, x.size // block)
        if rc != -1 or not np.array_equal(ref, got):
            return f"type {qtype}"
    return None
