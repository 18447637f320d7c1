// QuantMatMulW4A8 on the CPU: the op's reference body (export/ops.py) without materialising the weight.
//
// The main job's layers are 4-bit codes with a min per group of 32 (w = q * s + m, the source GGUF's
// Q4_1). For them a row's dot product with an activation row x is, per block b of 32 columns,
//     s_b * dx_b * sum_i q_i * xq_i  +  m_b * dx_b * sum_i xq_i   (quantized_sums = 1; 0: m_b * sum_i x_i)
// with x quantized to int8 per block (xq = round(x / dx), dx = max|x| / 127; MatMulNBits' accuracy_level
// 4 does the same). The integer sums are unsigned-nibble x signed-byte multiply-adds (vpmaddubsw), 64
// columns (two blocks) per pair of instructions, and the step reads 4 + 1 bits per weight (codes, fp16
// scale and min) where MatMulNBits' 8-bit container of the same layer reads 9.25 (export/ort_cpu.py).
//
// Work items are chunks of output rows; each reads its rows' codes once for every activation row.
#include "quant_matmul.h"

#include "half.h"
#include "shrinkrt_ops.gen.h"
#include "simd_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <vector>

#ifndef SHRINKRT_ISA
#define SHRINKRT_ISA base
#endif

namespace shrinkrt
{
namespace cpu
{
namespace SHRINKRT_ISA
{
namespace
{
// int8 activation block = the weight group (the contract's min format: 4 bits, group 32)
constexpr int64_t kBlock = contract::kActBlock;
static_assert(kBlock == contract::kWeightMinFormats[0][1] && contract::kWeightMinFormats[0][0] == 4 && kBlock == 32,
    "the layout: 4-bit codes, two 32-column blocks per 32 code bytes");
constexpr float kCodeMax = static_cast<float>(contract::kActCodeMax);
constexpr int64_t kPairBytes = 2 * kBlock; // activation bytes of a block pair (below)
constexpr int64_t kRowsPerItem = 16; // output rows of one work item
constexpr int64_t kUnpackMinRows = 4; // from this many activation rows, weight rows are unpacked once per item
constexpr int64_t kActRowsPerItem = 120; // activation rows of one work item (calls of many rows)

// The activations of one call, quantized per block of 32 columns. Per row and block pair (2p, 2p+1):
// 64 int8, even columns of block 2p, of 2p+1, then odd columns of 2p, of 2p+1: a code byte holds
// column 2i in its low nibble and 2i+1 in its high one, so 32 code bytes (two blocks) meet their
// activations in two aligned loads. dx and the plain block sums are padded to whole groups of 8 blocks.
struct QuantizedRows
{
    int64_t blocks, pairs, padded; // G, ceil(G/2), G rounded up to 8
    std::vector<int8_t> q; // (rows, pairs * 64)
    std::vector<float> dx, sum; // (rows, padded)
};

// One block of 32 activations: max |x|, sum, and round(x * inv) to nearest even (as std::nearbyint;
// vectorised, since a prompt quantizes every activation of every linear).
inline float absMax32(float const* v)
{
#if defined(__AVX2__)
    __m256 const mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 m = _mm256_and_ps(_mm256_loadu_ps(v), mask);
    for (int i = 8; i < kBlock; i += 8)
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(v + i), mask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
    float m = 0.f;
    for (int i = 0; i < kBlock; ++i)
        m = std::max(m, std::fabs(v[i]));
    return m;
#endif
}

inline float sum32(float const* v)
{
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < kBlock; ++i)
        s += v[i];
    return s;
}

inline void round32(float const* v, float inv, int32_t* code)
{
#if defined(__AVX2__)
    __m256 const f = _mm256_set1_ps(inv);
    for (int i = 0; i < kBlock; i += 8) // cvtps rounds to nearest even (the default MXCSR mode)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(code + i), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i), f)));
#else
    for (int i = 0; i < kBlock; ++i)
        code[i] = static_cast<int32_t>(std::nearbyint(v[i] * inv));
#endif
}

// quantizedSums: a block's sum is dx * (the sum of its codes), the min then meets the dequantized
// activations as the codes do (a Q4_1 weight's q * s is uncentred, 0..15 s: its product with the int8
// rounding error is the larger part, which the min's term cancels only when it sees the same xq)
void quantizeRow(float const* x, int64_t K, QuantizedRows& a, int64_t r, bool quantizedSums)
{
    int8_t* q = a.q.data() + r * a.pairs * kPairBytes;
    float* dx = a.dx.data() + r * a.padded;
    float* sum = a.sum.data() + r * a.padded;
    std::memset(q, 0, a.pairs * kPairBytes);
    std::fill(dx, dx + a.padded, 0.f);
    std::fill(sum, sum + a.padded, 0.f);
    for (int64_t b = 0; b < a.blocks; ++b)
    {
        float v[kBlock] = {};
        int64_t const n = std::min<int64_t>(kBlock, K - b * kBlock);
        std::memcpy(v, x + b * kBlock, n * sizeof(float));
        float const amax = absMax32(v);
        float const inv = amax > 0.f ? kCodeMax / amax : 0.f;
        dx[b] = amax / kCodeMax;
        int32_t code[kBlock];
        round32(v, inv, code);
        if (quantizedSums)
        {
            int32_t codeSum = 0;
            for (int i = 0; i < kBlock; ++i)
                codeSum += code[i];
            sum[b] = dx[b] * static_cast<float>(codeSum);
        }
        else
            sum[b] = sum32(v);
        int8_t* even = q + (b / 2) * kPairBytes + (b % 2) * (kBlock / 2);
        int8_t* odd = even + kBlock;
        for (int i = 0; i < kBlock / 2; ++i)
        {
            even[i] = static_cast<int8_t>(code[2 * i]);
            odd[i] = static_cast<int8_t>(code[2 * i + 1]);
        }
    }
}

inline float fp16(uint16_t h)
{
    return Half::toFloat(h);
}

#if defined(__AVX2__)
// Integer sums of one block pair from its nibbles: lanes 0-3 belong to block 2p, 4-7 to 2p+1.
inline __m256i pairSums(__m256i lo, __m256i hi, int8_t const* xq)
{
    __m256i const even = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(xq));
    __m256i const odd = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(xq + kBlock));
    // 15 * 127 * 2 per maddubs lane, two of them: far from int16's limit
    __m256i const s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

inline __m256 halves8(uint16_t const* p, bool whole, int64_t n) // 8 fp16 values (n of them when !whole)
{
    if (whole)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(p)));
    uint16_t t[8] = {};
    std::memcpy(t, p, n * sizeof(uint16_t));
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(t)));
}

inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// A work item's weight rows unpacked for a call of many activation rows: per row and block pair 64
// bytes, the 32 low nibbles then the 32 high ones, so each activation row reads them instead of
// unpacking the codes again.
void unpackRow(uint8_t const* codes, int64_t G, uint8_t* out)
{
    int64_t p = 0;
#if defined(__AVX2__)
    __m256i const low4 = _mm256_set1_epi8(0x0F);
    for (; 2 * p + 1 < G; ++p) // whole pairs
    {
        __m256i const c = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + p * 32));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * 64), _mm256_and_si256(c, low4));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * 64 + 32), _mm256_and_si256(_mm256_srli_epi16(c, 4), low4));
    }
#endif
    for (; p < (G + 1) / 2; ++p)
        for (int i = 0; i < 32; ++i)
        {
            uint8_t const c = 2 * p + i / 16 < G ? codes[p * 32 + i] : 0;
            out[p * 64 + i] = c & 0x0F;
            out[p * 64 + 32 + i] = c >> 4;
        }
}

// One output row (its codes, or with Unpacked its unpackRow bytes; its scales and mins) against
// activation row r, 4-bit with mins, group 32. `avail`: the scales (and mins) readable from the row's
// first, (N - n) * G: a group of 8 blocks past G is read whole where that stays inside the tensor (the
// values past G meet dx = 0 and sum = 0), else through a zero-padded copy.
template <bool Unpacked>
float int8Row(uint8_t const* codes, uint16_t const* scales, uint16_t const* mins, int64_t avail,
    QuantizedRows const& a, int64_t r)
{
    int8_t const* xq = a.q.data() + r * a.pairs * kPairBytes;
    float const* dx = a.dx.data() + r * a.padded;
    float const* sum = a.sum.data() + r * a.padded;
    int64_t const G = a.blocks;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    __m256i const order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); // hadd's lane order -> blocks 0..7
    __m256i const low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b8 = 0; b8 < G; b8 += 8)
    {
        __m256i v[4];
        for (int j = 0; j < 4; ++j)
        {
            int64_t const b = b8 + 2 * j, p = b / 2;
            if (b >= G)
                v[j] = _mm256_setzero_si256();
            else if (Unpacked)
                v[j] = pairSums(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + p * 64)),
                    _mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + p * 64 + 32)), xq + p * kPairBytes);
            else
            {
                // the last block of an odd count has no partner: 16 bytes, the rest zero
                __m256i const c = b + 1 < G ? _mm256_loadu_si256(reinterpret_cast<__m256i const*>(codes + b * 16))
                                            : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<__m128i const*>(codes + b * 16)));
                v[j] = pairSums(_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_srli_epi16(c, 4), low4), xq + p * kPairBytes);
            }
        }
        __m256i const h = _mm256_permutevar8x32_epi32(
            _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3])), order);
        bool const whole = b8 + 8 <= avail;
        int64_t const n = std::min<int64_t>(8, G - b8);
        __m256 const s = halves8(scales + b8, whole, n), m = halves8(mins + b8, whole, n);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(s, _mm256_loadu_ps(dx + b8)), acc);
        macc = _mm256_fmadd_ps(m, _mm256_loadu_ps(sum + b8), macc);
    }
    return hsum(_mm256_add_ps(acc, macc));
#else
    (void) avail;
    float y = 0.f;
    for (int64_t b = 0; b < G; ++b)
    {
        int8_t const* even = xq + (b / 2) * kPairBytes + (b % 2) * (kBlock / 2);
        int8_t const* odd = even + kBlock;
        int32_t isum = 0;
        for (int i = 0; i < kBlock / 2; ++i)
        {
            int const lo = Unpacked ? codes[(b / 2) * 64 + (b % 2) * 16 + i] : codes[b * 16 + i] & 0x0F;
            int const hi = Unpacked ? codes[(b / 2) * 64 + 32 + (b % 2) * 16 + i] : codes[b * 16 + i] >> 4;
            isum += lo * even[i] + hi * odd[i];
        }
        y += fp16(scales[b]) * dx[b] * static_cast<float>(isum) + fp16(mins[b]) * sum[b];
    }
    return y;
#endif
}

#if defined(__AVX2__)
// int8Row<true> for kTile activation rows r .. r+kTile-1 at once: each weight row's nibbles are loaded
// once per block pair for all of them (a prompt's calls; the result is the same, sum for sum).
constexpr int kTile = 6;
void int8RowsTile(uint8_t const* unpacked, uint16_t const* scales, uint16_t const* mins, int64_t avail,
    QuantizedRows const& a, int64_t r, float* y, int64_t yStride)
{
    int64_t const G = a.blocks, xStride = a.pairs * kPairBytes;
    int8_t const* xq = a.q.data() + r * xStride;
    __m256 acc[kTile]; // code sums and min terms alike: one accumulator per row keeps the tile in registers
    for (int t = 0; t < kTile; ++t)
        acc[t] = _mm256_setzero_ps();
    __m256i const order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b8 = 0; b8 < G; b8 += 8)
    {
        __m256i half[2][kTile];
        for (int j2 = 0; j2 < 2; ++j2)
        {
            __m256i v[2][kTile];
            for (int j1 = 0; j1 < 2; ++j1)
            {
                int64_t const b = b8 + 4 * j2 + 2 * j1, p = b / 2;
                if (b >= G)
                {
                    for (int t = 0; t < kTile; ++t)
                        v[j1][t] = _mm256_setzero_si256();
                    continue;
                }
                __m256i const lo = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(unpacked + p * 64));
                __m256i const hi = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(unpacked + p * 64 + 32));
                for (int t = 0; t < kTile; ++t)
                    v[j1][t] = pairSums(lo, hi, xq + t * xStride + p * kPairBytes);
            }
            for (int t = 0; t < kTile; ++t)
                half[j2][t] = _mm256_hadd_epi32(v[0][t], v[1][t]);
        }
        bool const whole = b8 + 8 <= avail;
        int64_t const n = std::min<int64_t>(8, G - b8);
        __m256 const s = halves8(scales + b8, whole, n), m = halves8(mins + b8, whole, n);
        for (int t = 0; t < kTile; ++t)
        {
            __m256i const h = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(half[0][t], half[1][t]), order);
            float const* dx = a.dx.data() + (r + t) * a.padded + b8;
            float const* sum = a.sum.data() + (r + t) * a.padded + b8;
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), _mm256_mul_ps(s, _mm256_loadu_ps(dx)), acc[t]);
            acc[t] = _mm256_fmadd_ps(m, _mm256_loadu_ps(sum), acc[t]);
        }
    }
    for (int t = 0; t < kTile; ++t)
        y[t * yStride] = hsum(acc[t]);
}
#endif

// Y = X @ W^T into io.y (rows, N)
void product(W4A8Shape const& s, W4A8IO const& io, ParallelFor const& parallel)
{
    int64_t const M = s.rows, N = s.outFeatures, K = s.inFeatures;
    size_t const items = static_cast<size_t>((N + kRowsPerItem - 1) / kRowsPerItem);
    // grown once per thread and reused: no allocation per decode step
    thread_local QuantizedRows a;
    a.blocks = (K + kBlock - 1) / kBlock;
    a.pairs = (a.blocks + 1) / 2;
    a.padded = (a.blocks + 7) / 8 * 8;
    a.q.resize(M * a.pairs * kPairBytes);
    a.dx.resize(M * a.padded);
    a.sum.resize(M * a.padded);
    QuantizedRows& rows = a; // thread_local: the pool's threads see it through this reference
    int64_t const quantItems = std::min<int64_t>(M, 64);
    parallel(static_cast<size_t>(quantItems), [&](size_t item) {
        for (int64_t r = item; r < M; r += quantItems)
            quantizeRow(io.x + r * K, K, rows, r, s.quantizedSums != 0);
    });
    int64_t const G = a.blocks, rowBytes = G * 16;
    auto const* codes = reinterpret_cast<uint8_t const*>(io.codes);
    uint16_t const* mins = io.mins;
    if (M < kUnpackMinRows)
    {
        parallel(items, [&](size_t item) {
            int64_t const n0 = item * kRowsPerItem, n1 = std::min<int64_t>(N, n0 + kRowsPerItem);
            for (int64_t r = 0; r < M; ++r)
                for (int64_t n = n0; n < n1; ++n)
                    io.y[r * N + n] = int8Row<false>(codes + n * rowBytes, io.scales + n * G, mins + n * G, (N - n) * G, rows, r);
        });
        return;
    }
    // many rows: items are (block of output rows, block of activation rows); each unpacks its weight
    // rows once into per-thread scratch (L1-sized) and runs its activation rows over them
    int64_t const rowBlocks = (M + kActRowsPerItem - 1) / kActRowsPerItem;
    parallel(items * rowBlocks, [&](size_t item) {
        int64_t const n0 = (item / rowBlocks) * kRowsPerItem, n1 = std::min<int64_t>(N, n0 + kRowsPerItem);
        int64_t const r0 = (item % rowBlocks) * kActRowsPerItem, r1 = std::min<int64_t>(M, r0 + kActRowsPerItem);
        int64_t const unpackedBytes = rows.pairs * 64;
        thread_local std::vector<uint8_t> unpacked;
        unpacked.resize(kRowsPerItem * unpackedBytes);
        for (int64_t n = n0; n < n1; ++n)
            unpackRow(codes + n * rowBytes, G, unpacked.data() + (n - n0) * unpackedBytes);
        int64_t r = r0;
#if defined(__AVX2__)
        for (; r + kTile <= r1; r += kTile)
            for (int64_t n = n0; n < n1; ++n)
                int8RowsTile(unpacked.data() + (n - n0) * unpackedBytes, io.scales + n * G, mins + n * G, (N - n) * G,
                    rows, r, io.y + r * N + n, N);
#endif
        for (; r < r1; ++r)
            for (int64_t n = n0; n < n1; ++n)
                io.y[r * N + n] = int8Row<true>(unpacked.data() + (n - n0) * unpackedBytes, io.scales + n * G,
                    mins + n * G, (N - n) * G, rows, r);
    });
}

} // namespace

// gated: the product into per-thread scratch (grown once), then silu(gate) * up row by row into y
void quantMatMulW4A8(W4A8Shape const& s, W4A8IO const& io, ParallelFor const& parallel)
{
    if (!s.gated)
        return product(s, io, parallel);
    int64_t const M = s.rows, N = s.outFeatures, half = N / 2;
    thread_local std::vector<float> full;
    if (full.size() < static_cast<size_t>(M * N))
        full.resize(static_cast<size_t>(M * N));
    W4A8IO inner = io;
    inner.y = full.data();
    product(s, inner, parallel);
    float const* p = full.data();
    auto gate = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
        {
            float const* g = p + r * N;
            float* y = io.y + r * half;
#pragma omp simd
            for (int64_t j = 0; j < half; ++j)
                y[j] = silu(g[j]) * g[half + j];
        }
    };
    if (M <= 4) // a decode step: too little to pay a pool dispatch
        return gate(0, M);
    constexpr int64_t kGateRows = 16;
    parallel(static_cast<size_t>((M + kGateRows - 1) / kGateRows), [&](size_t i) {
        int64_t const r0 = static_cast<int64_t>(i) * kGateRows;
        gate(r0, std::min(M, r0 + kGateRows));
    });
}

} // namespace SHRINKRT_ISA
} // namespace cpu
} // namespace shrinkrt
