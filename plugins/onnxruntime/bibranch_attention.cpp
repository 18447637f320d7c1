// BiBranchAttention on the CPU: the same results as the op's reference body (export/ops.py) and
// runtime/cskv.py, computed without materialising the dense keys of the feature branch.
//
// Work items are (batch, block of up to kQueryBlock queries, split of the feature rows), each over
// every head: a feature row is per token, shared by all KV heads, so an item dequantises it once and
// uses it for every query of its block and every query head (tiles of kRowTile rows, online softmax);
// the last split of a block also takes the window. Decode (one block) splits the feature rows so the
// pool has work, and merges the splits' partial sums afterwards (flash-decoding). A long prefill has
// enough blocks and runs unsplit, writing y directly.
#include "bibranch_attention.h"

#include "half.h"
#include "simd_exp.h"
#include "shrinkrt_ops.gen.h"

#include <algorithm>
#include <cmath>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstring>
#include <limits>
#include <string>
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
constexpr int64_t kQueryBlock = 16; // queries sharing one pass over the feature rows
constexpr int64_t kRowTile = 64; // feature rows dequantised together
constexpr int64_t kMinRowsPerSplit = 128; // below this a split costs more than it saves
constexpr int64_t kTargetItems = 8; // items of a decode step: enough to keep a small pool busy
// A call of at least this many query blocks rebuilds the feature branch's dense keys and values once
// (per token: r_k x G*D + r_v x G*D multiply-adds) and attends over them with head_dim-wide GEMMs, instead
// of working in feature space per block: per (query, row, head) that is 2*D multiply-adds instead of
// r_k + r_v (SmolLM2's calibrated ranks: 128 vs ~243), and no block dequantises or transposes rows again.
constexpr int64_t kDenseMinBlocks = 4;
constexpr int kGroup = contract::kFeatureGroup;


// The hot loops are inline: this file is compiled once per instruction set (CMake: AVX-512, AVX2+FMA,
// x86-64), each copy in its own namespace, and dispatch.cpp picks one at load time.
inline float dot(float const* a, float const* b, int64_t n)
{
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i)
        s += a[i] * b[i];
    return s;
}

inline void axpy(float a, float const* x, float* y, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        y[i] += a * x[i];
}

inline void scale(float a, float* y, int64_t n)
{
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        y[i] *= a;
}

// The tile products as small GEMMs on the ISA's native vectors (GCC vector extensions: the same source
// becomes zmm, ymm or xmm code in each copy of this file): kMR rows x kNV vectors of accumulators stay
// in registers while k runs, so each loaded vector of b feeds kMR FMAs.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
// AVX-512's 32 registers hold 6 x 4 accumulators, halving the reloads of b per multiply-add (the key
// rebuild's GEMMs stream k_up from L2); AVX2's and SSE's 16 hold 3 x 4
constexpr int kMR = kLanes == 16 ? 6 : 3, kNV = 4;
constexpr int kPad = 16; // value-feature rows padded to a multiple of every ISA's lanes

inline Vec loadVec(float const* p)
{
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline void storeVec(float* p, Vec v)
{
    std::memcpy(p, &v, sizeof v);
}

// kLanes fp16 values -> a Vec (F16C where the ISA has it; exact)
inline Vec loadVec(uint16_t const* p)
{
#if defined(__AVX512F__)
    // (the zero-masked form: GCC 12's plain _mm512_cvtph_ps warns of its own uninitialised operand, bug 105593)
    __m512 const v = _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<__m256i const*>(p)));
#elif defined(__F16C__)
    __m256 const v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(p)));
#else
    float v[kLanes];
    for (int i = 0; i < kLanes; ++i)
        v[i] = Half::toFloat(p[i]);
#endif
    Vec r;
    std::memcpy(&r, &v, sizeof r);
    return r;
}

// b is fp32 or fp16 (TB = uint16_t: the self-attention form's factors, converted as they are loaded)
template <int MR, int NV, typename TB>
void microKernel(float const* __restrict a, int64_t lda, TB const* __restrict b, int64_t ldb, int64_t K,
    float* __restrict c, int64_t ldc)
{
    Vec acc[MR][NV] = {};
    for (int64_t k = 0; k < K; ++k)
    {
        Vec bv[NV];
        for (int v = 0; v < NV; ++v)
            bv[v] = loadVec(b + k * ldb + v * kLanes);
        for (int m = 0; m < MR; ++m)
        {
            Vec const am = Vec{} + a[m * lda + k];
            for (int v = 0; v < NV; ++v)
                acc[m][v] += am * bv[v];
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v)
            storeVec(c + m * ldc + v * kLanes, loadVec(c + m * ldc + v * kLanes) + acc[m][v]);
}

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Transposes a kLanes x kLanes block held as kLanes vectors (rows) in place: log2(kLanes) stages, each
// swapping the off-diagonal b x b sub-blocks of every 2b x 2b block with two-input shuffles.
inline void transposeBlock(Vec* r)
{
    IVec iota;
    for (int c = 0; c < kLanes; ++c)
        iota[c] = c;
    for (int b = kLanes / 2; b >= 1; b /= 2)
    {
        IVec const upper = (iota & b) != 0; // columns in the upper half of their 2b block
        IVec const lo = upper ? iota - b + kLanes : iota; // row i keeps its lower half, takes row i+b's lower half
        IVec const hi = upper ? iota + kLanes : iota + b; // row i+b takes row i's upper half, keeps its own
        for (int i = 0; i < kLanes; ++i)
            if ((i & b) == 0)
            {
                Vec const x = r[i], y = r[i + b];
                r[i] = __builtin_shuffle(x, y, lo);
                r[i + b] = __builtin_shuffle(x, y, hi);
            }
    }
}

template <typename TB>
using MicroKernel = void (*)(float const*, int64_t, TB const*, int64_t, int64_t, float*, int64_t);
template <int MR, typename TB>
constexpr MicroKernel<TB> kKernelsOfRows[kNV]
    = {microKernel<MR, 1, TB>, microKernel<MR, 2, TB>, microKernel<MR, 3, TB>, microKernel<MR, 4, TB>};
template <typename TB>
constexpr MicroKernel<TB> const* kKernels[6] = {kKernelsOfRows<1, TB>, kKernelsOfRows<2, TB>, kKernelsOfRows<3, TB>,
    kKernelsOfRows<4, TB>, kKernelsOfRows<5, TB>, kKernelsOfRows<6, TB>}; // [rows - 1][vectors - 1], rows <= kMR

// The last N % kLanes columns of a GEMM: one partial vector, loaded and stored through a zeroed Vec.
template <int MR, typename TB>
void microKernelTail(float const* __restrict a, int64_t lda, TB const* __restrict b, int64_t ldb, int64_t K,
    float* __restrict c, int64_t ldc, int width)
{
    Vec acc[MR] = {};
    size_t const bytes = sizeof(float) * static_cast<size_t>(width);
    for (int64_t k = 0; k < K; ++k)
    {
        TB part[kLanes] = {};
        std::memcpy(part, b + k * ldb, sizeof(TB) * static_cast<size_t>(width));
        Vec const bv = loadVec(part);
        for (int m = 0; m < MR; ++m)
            acc[m] += (Vec{} + a[m * lda + k]) * bv;
    }
    for (int m = 0; m < MR; ++m)
    {
        Vec cv = {};
        std::memcpy(&cv, c + m * ldc, bytes);
        cv += acc[m];
        std::memcpy(c + m * ldc, &cv, bytes);
    }
}
template <typename TB>
using TailKernel = void (*)(float const*, int64_t, TB const*, int64_t, int64_t, float*, int64_t, int);
template <typename TB>
constexpr TailKernel<TB> kTailKernels[6] = {microKernelTail<1, TB>, microKernelTail<2, TB>, microKernelTail<3, TB>,
    microKernelTail<4, TB>, microKernelTail<5, TB>, microKernelTail<6, TB>};

// c (M x N) += a (M x K) b (K x N), row-major with leading dimensions; b fp32 or fp16.
template <typename TB>
void gemmAdd(float const* a, int64_t lda, TB const* b, int64_t ldb, float* c, int64_t ldc, int64_t M, int64_t N,
    int64_t K)
{
    int64_t const whole = N / kLanes * kLanes;
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
    {
        int const mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
        for (int64_t n0 = 0; n0 < whole; n0 += kNV * kLanes)
        {
            int const nv = static_cast<int>(std::min<int64_t>(kNV, (whole - n0) / kLanes));
            kKernels<TB>[mr - 1][nv - 1](a + m0 * lda, lda, b + n0, ldb, K, c + m0 * ldc + n0, ldc);
        }
        if (whole < N)
            kTailKernels<TB>[mr - 1](a + m0 * lda, lda, b + whole, ldb, K, c + m0 * ldc + whole, ldc,
                static_cast<int>(N - whole));
    }
}

// A factor matrix (k_up, v_up, k_down, v_down): fp32, or fp16 (the self-attention form's factors as the
// ort-cpu export stores them: half the bytes a decode step streams), read at an element offset.
struct Factor
{
    float const* f = nullptr;
    uint16_t const* h = nullptr;

    // c (M x N) += a (M x K) this[at ...] (K x N, leading dimension ldb)
    void gemm(float const* a, int64_t lda, size_t at, int64_t ldb, float* c, int64_t ldc, int64_t M, int64_t N,
        int64_t K) const
    {
        if (h)
            gemmAdd(a, lda, h + at, ldb, c, ldc, M, N, K);
        else
            gemmAdd(a, lda, f + at, ldb, c, ldc, M, N, K);
    }
    // x . this[at .. at+n)
    float dot(float const* x, size_t at, int64_t n) const
    {
        if (!h)
            return cpu::SHRINKRT_ISA::dot(x, f + at, n);
        Vec acc{};
        int64_t i = 0;
        for (; i + kLanes <= n; i += kLanes)
            acc += loadVec(x + i) * loadVec(h + at + i);
        float s = 0.f;
        for (int l = 0; l < kLanes; ++l)
            s += acc[l];
        for (; i < n; ++i)
            s += x[i] * Half::toFloat(h[at + i]);
        return s;
    }
    // y[0 .. n) += a * this[at .. at+n)
    void axpy(float a, size_t at, float* y, int64_t n) const
    {
        if (!h)
            return cpu::SHRINKRT_ISA::axpy(a, f + at, y, n);
        for (int64_t i = 0; i < n; ++i)
            y[i] += a * Half::toFloat(h[at + i]);
    }
};

// n fp16 values -> floats: F16C's vector conversion where the ISA has it (the ring is G*W*D values per
// call), else ONNX Runtime's scalar one (the same values: fp16 -> fp32 is exact).
inline void halvesToFloats(uint16_t const* h, float* out, int64_t n)
{
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(h + i))));
#endif
    for (; i < n; ++i)
        out[i] = Half::toFloat(h[i]);
}

// One fp16 value: F16C's conversion where the ISA has it (a decode step converts every stored row's
// group scales), else ONNX Runtime's scalar one.
inline float halfToFloat1(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return Half::toFloat(h);
#endif
}

// Rotate-half RoPE of `heads` consecutive head vectors at one position (cs, sn: that position's table
// rows); in and out may be the same.
inline void rotateHalf(float const* in, float* out, int heads, int D, float const* cs, float const* sn)
{
    int const half = D / 2;
    for (int h = 0; h < heads; ++h)
        for (int d = 0; d < half; ++d)
        {
            float const x1 = in[h * D + d], x2 = in[h * D + d + half];
            out[h * D + d] = x1 * cs[d] - x2 * sn[d];
            out[h * D + d + half] = x2 * cs[d + half] + x1 * sn[d + half];
        }
}

// rows x cols (row-major, leading dimension lds) -> cols x rows (leading dimension ldd), kLanes x kLanes
// blocks through registers; rows and cols multiples of kLanes.
inline void transposeInto(float const* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd)
{
    for (int64_t r0 = 0; r0 < rows; r0 += kLanes)
        for (int64_t c0 = 0; c0 < cols; c0 += kLanes)
        {
            Vec blk[kLanes];
            for (int i = 0; i < kLanes; ++i)
                blk[i] = loadVec(src + (r0 + i) * lds + c0);
            transposeBlock(blk);
            for (int i = 0; i < kLanes; ++i)
                storeVec(dst + (c0 + i) * ldd + r0, blk[i]);
        }
}

int64_t rowWidth(int r, int bits)
{
    return bits == 4 ? (r + 1) / 2 : r;
}

int64_t nGroups(int r)
{
    return (r + kGroup - 1) / kGroup;
}

// 32 int4 features (16 bytes, low nibble = even feature) -> floats times their group's scale: the
// sign-extended bytes' nibbles by shifts, converted, interleaved back into feature order. The scalar
// loop in dequantRow is the fallback (a decode step at depth unpacks every stored row once).
// (GCC 12 warns of an uninitialised variable inside its own AVX-512 intrinsics headers: GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline bool unpackGroup32(int8_t const* bytes, float s, float* out)
{
#if defined(__AVX512F__) && defined(__AVX512BW__)
    __m512i const w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<__m128i const*>(bytes)));
    __m512 const lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(w, 28), 28));
    __m512 const hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(w, 4));
    __m512i const first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    __m512i const second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    __m512 const sv = _mm512_set1_ps(s);
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), sv));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), sv));
    return true;
#elif defined(__AVX2__)
    __m256 const sv = _mm256_set1_ps(s);
    for (int half = 0; half < 2; ++half) // 8 bytes -> 16 features
    {
        __m256i const w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<__m128i const*>(bytes + 8 * half)));
        __m256 const lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 28), 28));
        __m256 const hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(w, 4));
        __m256 const a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi); // (l0 h0 l1 h1 | l4 ..), (l2 .. | l6 ..)
        _mm256_storeu_ps(out + 16 * half, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x20), sv));
        _mm256_storeu_ps(out + 16 * half + 8, _mm256_mul_ps(_mm256_permute2f128_ps(a, b, 0x31), sv));
    }
    return true;
#else
    (void) bytes, (void) s, (void) out;
    return false;
#endif
}
#pragma GCC diagnostic pop

// One stored row -> r floats.
inline void dequantRow(void const* codes, uint16_t const* scales, int r, int bits, float* out)
{
    if (bits == 16)
    {
        halvesToFloats(static_cast<uint16_t const*>(codes), out, r);
        return;
    }
    auto const* c = static_cast<int8_t const*>(codes);
    for (int g0 = 0; g0 < r; g0 += kGroup)
    {
        float const s = halfToFloat1(scales[g0 / kGroup]);
        int const end = std::min(r, g0 + kGroup);
        if (bits == 8)
        {
#pragma omp simd
            for (int i = g0; i < end; ++i)
                out[i] = static_cast<float>(c[i]) * s;
            continue;
        }
        int8_t const* bytes = c + g0 / 2;
        float* o = out + g0;
        if (end - g0 == kGroup && unpackGroup32(bytes, s, o))
            continue;
        int const pairs = (end - g0) / 2; // whole bytes: low nibble = even feature, sign by shifts
#pragma omp simd
        for (int i = 0; i < pairs; ++i)
        {
            int const v = bytes[i];
            o[2 * i] = static_cast<float>(static_cast<int8_t>(v << 4) >> 4) * s;
            o[2 * i + 1] = static_cast<float>(v >> 4) * s;
        }
        if ((end - g0) % 2) // an odd rank's last feature
            o[2 * pairs] = static_cast<float>(static_cast<int8_t>(bytes[pairs] << 4) >> 4) * s;
    }
}

// One new row (r floats) -> its stored form (codes, scales) and the values a later call reads back.
void quantizeRow(float const* x, int r, int bits, void* codes, uint16_t* scales, float* back)
{
    if (bits == 16)
    {
        auto* h = static_cast<uint16_t*>(codes);
        for (int i = 0; i < r; ++i)
        {
            h[i] = Half::fromFloat(x[i]);
            back[i] = Half::toFloat(h[i]);
        }
        return;
    }
    float const qmax = static_cast<float>((1 << (bits - 1)) - 1);
    auto* c = static_cast<int8_t*>(codes);
    if (bits == 4)
        std::memset(c, 0, static_cast<size_t>(rowWidth(r, bits)));
    for (int g0 = 0; g0 < r; g0 += kGroup)
    {
        int const end = std::min(r, g0 + kGroup);
        float amax = 0.f;
        for (int i = g0; i < end; ++i)
            amax = std::max(amax, std::fabs(x[i]));
        uint16_t const s16 = Half::fromFloat(std::max(amax / qmax, contract::kScaleFloor));
        float const s = Half::toFloat(s16);
        scales[g0 / kGroup] = s16;
        for (int i = g0; i < end; ++i)
        {
            // nearbyint: round half to even (the default rounding mode), as ONNX Round and torch.round
            float const q = std::min(std::max(std::nearbyint(x[i] / s), -qmax - 1.f), qmax);
            back[i] = q * s;
            if (bits == 8)
                c[i] = static_cast<int8_t>(q);
            else
            {
                int const nib = static_cast<int>(q) & 15;
                c[i / 2] = static_cast<int8_t>(static_cast<uint8_t>(c[i / 2]) | (i % 2 == 0 ? nib : nib << 4));
            }
        }
    }
}

// Post-RoPE key scores straight from int4 codes, in integers (a decode step at depth dots every stored
// key row with each query head: dequantising and transposing the rows cost more than the products).
// The folded query is rounded per group of kGroup ranks to 22 bits, q = 2^14 h + 2^7 m + l (h in
// [-128, 127], m and l in [0, 127]: three int8 "digits"; an error <= 2^-22 of its group's largest. Two
// digits, 15 bits, moved a tiny model's logits over 40 decode steps by 1.4e-3 from the reference
// runtime's, through the softmax; three: 2e-6, the fp32 path: 1.4e-4); a code c (-8..7) enters as the unsigned c + 8,
// the excess 8 * sum(q) taken off per group (every int32 sum stays below 2^30). Each 4-byte chunk of a row holds 8 ranks (the low nibbles:
// ranks 0, 2, 4, 6; the high: 1, 3, 5, 7), so with kLanes rows in the lanes one byte dot product
// instruction (VNNI's vpdpbusd, else vpmaddubsw + vpmaddwd) does 4 ranks of kLanes rows.
#if defined(__AVX512BW__) || defined(__AVX2__)
constexpr bool kIntKeyScores = true;
#else
constexpr bool kIntKeyScores = false;
#endif
constexpr int kMaxIntGroups = 32; // ranks <= 1024 (more: the fp32 path)

struct IntQueries
{
    int groups = 0; // ceil(r_k / kGroup); a group is 4 chunks (the last one's padding: q = 0)
    int nDigits = 3; // 3: q to 22 bits (the op's fp32 product); 1: q is the int8 query itself (query_bits = 8)
    std::vector<int32_t> digits; // (rows, 4 * groups, 6): per chunk the bytes h, m, l of the even ranks, then the odd
    std::vector<float> scales; // (rows, groups)
    std::vector<int32_t> excess; // (rows, groups): 8 * sum(q)
};

// query_bits = 8: each row of r folded query values rounded in place to its int8 codes times their
// scale, per group of kGroup ranks (the contract's form: what the fp32 tiles dot and what
// quantizeQueries' one digit reproduces exactly)
void roundQueries(float* qf, int64_t rows, int r)
{
    for (int64_t x = 0; x < rows; ++x)
        for (int g0 = 0; g0 < r; g0 += kGroup)
        {
            float* v = qf + x * r + g0;
            int const n = std::min(kGroup, r - g0);
            float amax = 0.f;
            for (int i = 0; i < n; ++i)
                amax = std::max(amax, std::fabs(v[i]));
            float const codeMax = static_cast<float>(contract::kQueryCodeMax);
            float const inv = amax > 0.f ? codeMax / amax : 0.f, scale = amax / codeMax;
            for (int i = 0; i < n; ++i)
                v[i] = std::nearbyint(v[i] * inv) * scale;
        }
}

void quantizeQueries(float const* qf, int64_t rows, int RK, int queryBits, IntQueries& out)
{
    int const groups = out.groups = static_cast<int>(nGroups(RK));
    out.nDigits = queryBits == 8 ? 1 : 3;
    out.digits.assign(static_cast<size_t>(rows) * groups * 24, 0);
    out.scales.resize(static_cast<size_t>(rows) * groups);
    out.excess.resize(static_cast<size_t>(rows) * groups);
    for (int64_t x = 0; x < rows; ++x)
        for (int g = 0; g < groups; ++g)
        {
            float const* v = qf + x * RK + g * kGroup;
            int const n = std::min(kGroup, RK - g * kGroup);
            float amax = 0.f;
            for (int i = 0; i < n; ++i)
                amax = std::max(amax, std::fabs(v[i]));
            // one digit: the contract's int8 query (contract::kQueryCodeMax, as the body rounds it); three: 2^21 - 1
            float const kQMax = out.nDigits == 1 ? static_cast<float>(contract::kQueryCodeMax) : 2097151.f;
            float const inv = amax > 0.f ? kQMax / amax : 0.f;
            int32_t q[kGroup] = {}, sum = 0;
            for (int i = 0; i < n; ++i)
                sum += q[i] = static_cast<int32_t>(std::nearbyint(v[i] * inv));
            out.scales[x * groups + g] = amax / kQMax;
            out.excess[x * groups + g] = 8 * sum;
            int32_t* d = out.digits.data() + (x * groups + g) * 24;
            for (int c = 0; c < 4; ++c)
                for (int k = 0; k < 4; ++k)
                    for (int odd = 0; odd < 2; ++odd)
                    {
                        int32_t const e = q[8 * c + 2 * k + odd];
                        bool const one = out.nDigits == 1; // the code itself in the first digit's place
                        uint32_t const digit[3] = {static_cast<uint8_t>(one ? e : e >> 14),
                            one ? 0u : static_cast<uint32_t>((e >> 7) & 127), one ? 0u : static_cast<uint32_t>(e & 127)};
                        for (int i = 0; i < 3; ++i)
                            d[6 * c + 3 * odd + i] |= static_cast<int32_t>(digit[i] << (8 * k));
                    }
        }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The first `bytes` (< a Vec's) of p, zero after: a masked load where the ISA has one (no call, no
// read past the end)
inline Vec loadPart(int8_t const* p, int64_t bytes)
{
    Vec v{};
#if defined(__AVX512BW__)
    __m512i const x = _mm512_maskz_loadu_epi8((__mmask64(1) << bytes) - 1, p);
    std::memcpy(&v, &x, sizeof v);
#else
    std::memcpy(&v, p, static_cast<size_t>(bytes));
#endif
    return v;
}

// acc + the 4-byte dot products of u (unsigned bytes) and the broadcast s (signed bytes), per lane
inline IVec dotBytes(IVec acc, IVec u, int32_t s)
{
#if defined(__AVX512VNNI__)
    return reinterpret_cast<IVec>(_mm512_dpbusd_epi32(reinterpret_cast<__m512i>(acc), reinterpret_cast<__m512i>(u),
        _mm512_set1_epi32(s)));
#elif defined(__AVX512BW__)
    __m512i const p = _mm512_maddubs_epi16(reinterpret_cast<__m512i>(u), _mm512_set1_epi32(s)); // |sum| <= 3840
    return acc + reinterpret_cast<IVec>(_mm512_madd_epi16(p, _mm512_set1_epi16(1)));
#elif defined(__AVX2__)
    __m256i const p = _mm256_maddubs_epi16(reinterpret_cast<__m256i>(u), _mm256_set1_epi32(s));
    return acc + reinterpret_cast<IVec>(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#else
    (void) u, (void) s;
    return acc;
#endif
}

// Scores of query rows x0 .. x0+nx (of q) against n <= kLanes consecutive stored key rows (codes: the
// first row's, ck bytes a row; scales: its group scales, gk a row): sc[x * ldsc + i] for row i.
void intKeyScores(int8_t const* codes, int64_t ck, uint16_t const* scales, int64_t gk, int64_t n,
    IntQueries const& q, int64_t x0, int64_t nx, float* sc, int64_t ldsc)
{
    int const groups = q.groups, chunks = 4 * groups;
    float rowScales[kMaxIntGroups * kLanes]; // group-major: a group's kLanes rows contiguous
    for (int g = 0; g < groups; ++g)
        for (int i = 0; i < kLanes; ++i)
            rowScales[g * kLanes + i] = i < n ? halfToFloat1(scales[i * gk + g]) : 0.f;
    for (int cb = 0; cb < chunks; cb += kLanes) // kLanes chunks of every row, transposed: lane i = row i
    {
        Vec blk[kLanes];
        int64_t const bytes = std::max<int64_t>(0, std::min<int64_t>(4 * kLanes, ck - 4 * cb));
        for (int i = 0; i < kLanes; ++i)
            blk[i] = i >= n ? Vec{} : bytes == sizeof(Vec) ? loadVec(reinterpret_cast<float const*>(codes + i * ck + 4 * cb))
                                                           : loadPart(codes + i * ck + 4 * cb, bytes);
        transposeBlock(blk);
        for (int c0 = 0; c0 < std::min(kLanes, chunks - cb); c0 += 4) // one group: 4 chunks, 32 ranks
        {
            int const g = (cb + c0) / 4;
            IVec even[4], odd[4];
            for (int c = 0; c < 4; ++c)
            {
                IVec const u = reinterpret_cast<IVec>(blk[c0 + c]) ^ static_cast<int32_t>(0x88888888u); // c + 8
                even[c] = u & 0x0F0F0F0F;
                odd[c] = (u >> 4) & 0x0F0F0F0F; // (arithmetic shift: the top byte's sign bits masked off)
            }
            Vec const rs = loadVec(rowScales + g * kLanes);
            if (q.nDigits == 1) // the int8 query: 8 dot products a row; 3 rows at a time, even and odd ranks in
            {                    // their own chains (6 chains of 4 hide the instruction's latency), the excess
                constexpr int XR1 = 3; // taken off at the start
                for (int64_t x = x0; x < x0 + nx; x += XR1)
                {
                    int const xr = static_cast<int>(std::min<int64_t>(XR1, x0 + nx - x));
                    IVec acc[XR1][2];
                    for (int r = 0; r < XR1; ++r)
                    {
                        int64_t const row = x + (r < xr ? r : 0);
                        int32_t const* d = q.digits.data() + (row * groups + g) * 24;
                        acc[r][0] = IVec{} - q.excess[row * groups + g];
                        acc[r][1] = IVec{};
                        for (int c = 0; c < 4; ++c)
                        {
                            acc[r][0] = dotBytes(acc[r][0], even[c], d[6 * c]);
                            acc[r][1] = dotBytes(acc[r][1], odd[c], d[6 * c + 3]);
                        }
                    }
                    for (int r = 0; r < xr; ++r)
                    {
                        Vec const part = __builtin_convertvector(acc[r][0] + acc[r][1], Vec) * (rs * q.scales[(x + r) * groups + g]);
                        float* out = sc + (x + r - x0) * ldsc;
                        storeVec(out, g == 0 ? part : loadVec(out) + part);
                    }
                }
                continue;
            }
            // XR query rows at a time, each digit's even and odd products in their own accumulators: 6 * XR
            // independent chains of 4 dot products hide the instruction's latency
            constexpr int XR = kLanes == 16 ? 2 : 1;
            for (int64_t x = x0; x < x0 + nx; x += XR)
            {
                int const xr = static_cast<int>(std::min<int64_t>(XR, x0 + nx - x));
                IVec acc[XR][6] = {};
                for (int r = 0; r < XR; ++r)
                {
                    int32_t const* d = q.digits.data() + ((x + (r < xr ? r : 0)) * groups + g) * 24;
                    for (int c = 0; c < 4; ++c)
                        for (int i = 0; i < 3; ++i)
                        {
                            acc[r][i] = dotBytes(acc[r][i], even[c], d[6 * c + i]);
                            acc[r][3 + i] = dotBytes(acc[r][3 + i], odd[c], d[6 * c + 3 + i]);
                        }
                }
                for (int r = 0; r < xr; ++r)
                {
                    IVec const* a = acc[r];
                    IVec const tot = ((a[0] + a[3]) << 14) + ((a[1] + a[4]) << 7) + a[2] + a[5] - q.excess[(x + r) * groups + g];
                    Vec const part = __builtin_convertvector(tot, Vec) * (rs * q.scales[(x + r) * groups + g]);
                    float* out = sc + (x + r - x0) * ldsc;
                    storeVec(out, g == 0 ? part : loadVec(out) + part);
                }
            }
        }
    }
}
#pragma GCC diagnostic pop

// Online-softmax state of one (query, head), accLen floats: max, total mass, feature-branch mass,
// weighted window values (D), weighted value features (r_v; the up-projection is applied once at the end)
enum AccField
{
    kMax,
    kMass,
    kFeatMass,
    kSums
};

// Rescales an accumulator to a new running max.
inline void rebase(float* a, float m, size_t len)
{
    if (a[kMax] == m)
        return;
    float const f = a[kMax] == -std::numeric_limits<float>::infinity() ? 0.f : expNonPositive(a[kMax] - m);
    a[kMax] = m;
    a[kMass] *= f;
    a[kFeatMass] *= f;
    scale(f, a + kSums, static_cast<int64_t>(len - kSums));
}

// One (query, head)'s scores s[0, len) -> softmax weights in place, merged into its accumulator's
// running max; only columns lo..hi count (masked ones get weight 0). Returns their mass. Whole-row
// loops with a mask: a fixed trip count vectorises.
inline float softmaxInto(float* s, int64_t len, int64_t lo, int64_t hi, float* acc, size_t accLen)
{
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < len; ++i)
    {
        float const v = i >= lo && i <= hi ? s[i] : -std::numeric_limits<float>::infinity();
        m = m > v ? m : v;
    }
    rebase(acc, std::max(acc[kMax], m), accLen);
    float const mx = acc[kMax];
    float mass = 0.f;
#pragma omp simd reduction(+ : mass)
    for (int64_t i = 0; i < len; ++i)
    {
        float const e = i >= lo && i <= hi ? expNonPositive(s[i] - mx) : 0.f;
        s[i] = e;
        mass += e;
    }
    acc[kMass] += mass;
    return mass;
}

// Per-thread scratch, grown once and reused by every call (no allocation per decode step).
// Per-call arrays of the calling thread (this call's rows, the queries, the split partials), also
// grown once: a decode step allocates nothing.
struct CallBuffers
{
    std::vector<float> newCK, newCV, newK, newV, qd, qf, partials, denseK, denseV;
};

float* grow(std::vector<float>& v, size_t n)
{
    if (v.size() < n)
        v.resize(n);
    return v.data();
}

std::vector<float>& scratch(size_t n)
{
    thread_local std::vector<float> buf;
    if (buf.size() < n)
        buf.resize(n);
    return buf;
}
} // namespace

void biBranchAttention(BiBranchShape const& s, BiBranchIO const& io, ParallelFor const& parallel)
{
    int64_t const B = s.batch, T = s.tokens, S = s.capacity, P = io.past;
    int const H = s.heads, G = s.kvHeads, D = s.headDim, W = s.window, RK = s.rankK, RV = s.rankV;
    int const rep = H / G, bits = s.bits;
    bool const post = s.keyMode == contract::kKeyModePostRope;
    int64_t const ck = rowWidth(RK, bits), cv = rowWidth(RV, bits), gk = nGroups(RK), gv = nGroups(RV);
    size_t const featBytes = bits == 16 ? 2 : 1;
    float const qScale = 1.f / std::sqrt(static_cast<float>(D));
    Factor const kUp{io.kUp, io.kUpH}, vUp{io.vUp, io.vUpH};

    // a decode step's side work is too small to pay a pool dispatch (~10 us each): run it inline
    bool const fewTokens = B * T <= 4;
    auto light = [&](size_t n, std::function<void(size_t)> const& fn) {
        if (fewTokens)
            for (size_t i = 0; i < n; ++i)
                fn(i);
        else
            parallel(n, fn);
    };
    // 1. this call's feature rows: stored form (outputs) and read-back values (used below)
    thread_local CallBuffers cb;
    float* newCK = grow(cb.newCK, static_cast<size_t>(B * T * RK));
    float* newCV = grow(cb.newCV, static_cast<size_t>(B * T * RV));
    light(static_cast<size_t>(B * T), [&](size_t row) {
        quantizeRow(io.cK + row * RK, RK, bits, static_cast<char*>(io.featKNew) + row * ck * featBytes,
            bits < 16 ? io.featKScalesNew + row * gk : nullptr, newCK + row * RK);
        quantizeRow(io.cV + row * RV, RV, bits, static_cast<char*>(io.featVNew) + row * cv * featBytes,
            bits < 16 ? io.featVScalesNew + row * gv : nullptr, newCV + row * RV);
    });
    // 2. the ring after this call (later tokens overwrite earlier ones in a slot) and the new keys and
    //    values as the ring stores them (fp16)
    size_t const ring = static_cast<size_t>(B * G * W * D);
    std::memcpy(io.winKOut, io.winK, ring * 2);
    std::memcpy(io.winVOut, io.winV, ring * 2);
    float* newK = grow(cb.newK, static_cast<size_t>(B * T * G * D));
    float* newV = grow(cb.newV, static_cast<size_t>(B * T * G * D));
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
            for (int g = 0; g < G; ++g)
            {
                size_t const src = ((b * T + t) * G + g) * D;
                size_t const slot = ((b * G + g) * W + (P + t) % W) * D;
                for (int d = 0; d < D; ++d)
                {
                    uint16_t const kh = Half::fromFloat(io.k[src + d]), vh = Half::fromFloat(io.v[src + d]);
                    io.winKOut[slot + d] = kh;
                    io.winVOut[slot + d] = vh;
                    newK[src + d] = Half::toFloat(kh);
                    newV[src + d] = Half::toFloat(vh);
                }
            }
    int64_t const nBlocks = (T + kQueryBlock - 1) / kQueryBlock;
    int64_t const maxFeatRows = std::max<int64_t>(0, P + T - W); // rows the last query attends
    bool const dense = nBlocks >= kDenseMinBlocks && D % kPad == 0 && maxFeatRows > 0;
    // 3. queries, scaled (qd); post-RoPE in feature space also folded through their KV head's key
    //    up-projection (qf)
    int const QK = post ? RK : D; // width of what a query dots a feature row with
    float* qd = grow(cb.qd, static_cast<size_t>(B * T * H * D));
    float* qf = post && !dense ? grow(cb.qf, static_cast<size_t>(B * T * H * RK)) : nullptr;
    // ranks r0 .. r1 of every query's fold through k_up (the rows of k_up it reads, once for all queries)
    auto fold = [&](int64_t bth0, int64_t bth1, int64_t r0, int64_t r1) {
        for (int64_t bth = bth0; bth < bth1; ++bth)
        {
            int const g = static_cast<int>(bth % H) / rep;
            for (int64_t r = r0; r < r1; ++r)
                qf[bth * RK + r] = kUp.dot(qd + bth * D, static_cast<size_t>(r) * G * D + g * D, D);
        }
    };
    light(static_cast<size_t>(B * T * H), [&](size_t bth) {
        float* q = qd + bth * D;
        for (int d = 0; d < D; ++d)
            q[d] = io.q[bth * D + d] * qScale;
        if (qf && !fewTokens)
            fold(static_cast<int64_t>(bth), static_cast<int64_t>(bth) + 1, 0, RK);
    });
    if (qf && fewTokens) // a decode step: k_up (fp32, r_k x G*D) streamed by both cores, split by rank
    {
        constexpr int64_t kRanks = 64;
        parallel(static_cast<size_t>((RK + kRanks - 1) / kRanks), [&](size_t i) {
            int64_t const r0 = static_cast<int64_t>(i) * kRanks;
            fold(0, B * T * H, r0, std::min<int64_t>(RK, r0 + kRanks));
        });
    }
    // query_bits = 8 in a short call: the folded queries as their int8 codes times their scales
    bool const int8Queries = qf && s.queryBits == 8 && T <= contract::kQueryBitsMaxTokens;
    if (int8Queries)
        roundQueries(qf, B * T * H, RK);
    float const* qFeat = qf ? qf : qd;

    // 4. attention: items (b, query block, split), each over every head: a feature row is shared by
    //    all KV heads (c is per token), so it is dequantised once per item
    // Pre-RoPE, a step rebuilds every stored key (r_k x G*D multiply-adds per row, the step's main cost at
    // depth): per tile as one register-blocked GEMM, not r_k axpys through each row (2x the step's speed
    // at depth 512). A row then costs ~1 us, so a split of one tile already pays for its dispatch.
    bool const rebuildByGemm = !post && !dense && (G * D) % kLanes == 0;
    int64_t const minRowsPerSplit = rebuildByGemm ? kRowTile : kMinRowsPerSplit;
    int64_t nSplit = std::max<int64_t>(1, (kTargetItems + B * nBlocks - 1) / (B * nBlocks));
    nSplit = std::max<int64_t>(1, std::min(nSplit, maxFeatRows / minRowsPerSplit));
    int64_t splitLen = std::max<int64_t>(1, (maxFeatRows + nSplit - 1) / nSplit);
    if (dense || rebuildByGemm) // splits start on a tile of the rebuilt rows
        splitLen = (splitLen + kRowTile - 1) / kRowTile * kRowTile;
    int64_t const RVp = (RV + kPad - 1) / kPad * kPad; // value features as the tile GEMM reads them
    size_t const accLen = 3 + D + RVp;
    size_t const perItem = static_cast<size_t>(kQueryBlock * H) * accLen;
    int const KW = post ? RK : G * D; // a tile row: c_k (post-RoPE) or the rebuilt keys of every KV head
    float* partials = nSplit > 1 ? grow(cb.partials, static_cast<size_t>(B * nBlocks * nSplit) * perItem) : nullptr;
    // post-RoPE int4 keys of the input store: scored in integers (intKeyScores), not dequantised
    bool const intKeys = kIntKeyScores && post && !dense && bits == 4 && nGroups(RK) <= kMaxIntGroups;

    // y = (window sums + feature sums @ v_up + feature mass * v_bias) / mass, for the rep query heads of
    // KV head g at once (their accumulators `stride` floats apart): the up-projection is one small GEMM
    // (rep x RV times RV x D), its accumulators in registers, not RV axpys through y
    auto finishGroup = [&](int64_t b, int64_t t, int g, float const* a, size_t stride) {
        float* y = io.y + ((b * T + t) * H + g * rep) * D;
        for (int i = 0; i < rep; ++i)
            for (int d = 0; d < D; ++d)
                y[i * D + d] = a[i * stride + kSums + d] + a[i * stride + kFeatMass] * io.vBias[g * D + d];
        if (dense) // the dense path summed rebuilt values (without bias) into the window sums
            ;
        else if (D % kLanes == 0)
            vUp.gemm(a + kSums + D, static_cast<int64_t>(stride), g * D, G * D, y, D, rep, D, RV);
        else
            for (int i = 0; i < rep; ++i)
                for (int r = 0; r < RV; ++r)
                    vUp.axpy(a[i * stride + kSums + D + r], static_cast<size_t>(r) * G * D + g * D, y + i * D, D);
        for (int i = 0; i < rep; ++i)
            scale(1.f / a[i * stride + kMass], y + i * D, D);
    };
    // where row j of a store is: the input store (j < past) or this call's rows
    auto featRow = [&](bool isKey, int64_t b, int64_t j, float* out) {
        int const r = isKey ? RK : RV;
        if (j >= P)
        {
            std::memcpy(out, (isKey ? newCK : newCV) + (b * T + j - P) * r, sizeof(float) * r);
            return;
        }
        int64_t const width = isKey ? ck : cv, groups = isKey ? gk : gv;
        void const* codes = static_cast<char const*>(isKey ? io.featK : io.featV) + (b * S + j) * width * featBytes;
        uint16_t const* sc = bits < 16 ? (isKey ? io.featKScales : io.featVScales) + (b * S + j) * groups : nullptr;
        dequantRow(codes, sc, r, bits, out);
    };

    // The window of a query block: the keys at positions first..last (the block's windows together,
    // <= kQueryBlock + W - 1 of them) from the ring or this call, per KV head feature-major (D, Lp) for
    // the scores and row-major (L, D) for the value sums; each query masks the ones outside its own
    // window (p - W < j <= p).
    auto windowByGemm = [&](int64_t b, int64_t t0, int64_t nq, float const* qg, float* accs) {
        int64_t const first = std::max<int64_t>(0, P + t0 - W + 1), last = P + t0 + nq - 1;
        int64_t const L = last - first + 1, Lp = (L + kPad - 1) / kPad * kPad;
        size_t const nh = static_cast<size_t>(nq) * H;
        thread_local std::vector<float> wbuf;
        float* kt = grow(wbuf, static_cast<size_t>(G) * D * Lp * 2 + nh * Lp + static_cast<size_t>(Lp) * D); // (G, D, Lp)
        float* vr = kt + static_cast<size_t>(G) * D * Lp; // (G, Lp, D)
        float* ws = vr + static_cast<size_t>(G) * Lp * D; // (nh, Lp) scores, then weights
        float* kr = ws + nh * Lp; // (Lp, D) one KV head's keys row-major, before the transpose
        for (int g = 0; g < G; ++g)
        {
            float* ktg = kt + static_cast<size_t>(g) * D * Lp;
            float* vg = vr + static_cast<size_t>(g) * Lp * D;
            for (int64_t i = 0; i < L; ++i)
            {
                int64_t const j = first + i;
                if (j < P)
                {
                    size_t const slot = ((b * G + g) * W + j % W) * static_cast<size_t>(D);
                    halvesToFloats(io.winK + slot, kr + i * D, D);
                    halvesToFloats(io.winV + slot, vg + i * D, D);
                }
                else
                {
                    size_t const at = ((b * T + (j - P)) * G + g) * static_cast<size_t>(D);
                    std::memcpy(kr + i * D, newK + at, sizeof(float) * D);
                    std::memcpy(vg + i * D, newV + at, sizeof(float) * D);
                }
            }
            std::fill(kr + L * D, kr + Lp * D, 0.f); // keys past the window's last: zero columns
            transposeInto(kr, D, Lp, D, ktg, Lp); // feature-major
        }
        std::fill(ws, ws + nh * Lp, 0.f);
        int64_t const nqr = nq * rep; // rows of one KV head (g-major: row g*nqr + qi*rep + i)
        for (int g = 0; g < G; ++g) // a KV head's window keys serve its rep query heads of every query
            gemmAdd(qg + g * nqr * D, D, kt + static_cast<size_t>(g) * D * Lp, Lp, ws + g * nqr * Lp, Lp, nqr, Lp, D);
        for (size_t x = 0; x < nh; ++x)
        {
            int64_t const p = P + t0 + static_cast<int64_t>(x) % nqr / rep;
            int64_t const lo = std::max<int64_t>(0, p - W + 1) - first, hi = p - first; // this query's columns
            softmaxInto(ws + x * Lp, Lp, lo, hi, accs + x * accLen, accLen);
        }
        for (int g = 0; g < G; ++g) // window sums += weights x the window's values
            gemmAdd(ws + g * nqr * Lp, Lp, vr + static_cast<size_t>(g) * Lp * D, D, accs + g * nqr * accLen + kSums,
                static_cast<int64_t>(accLen), nqr, D, L);
    };

    // The dense path's rebuilt feature rows, tile by tile of kRowTile rows, each tile per KV head: keys
    // feature-major (D, kRowTile) as the score GEMM reads them (the layout of tileKey below), values
    // row-major (kRowTile, D). Pre-RoPE K_j = RoPE(c_j @ k_up + k_bias, j); post-RoPE K_j = c_j @ k_up
    // (dotted with the unfolded query, the same product); V_j = c_j @ v_up (v_bias via the feature mass).
    int64_t const nTiles = dense ? (maxFeatRows + kRowTile - 1) / kRowTile : 0;
    size_t const tileFloats = static_cast<size_t>(kRowTile) * G * D;
    float* denseK = dense ? grow(cb.denseK, static_cast<size_t>(B * nTiles) * tileFloats) : nullptr;
    float* denseV = dense ? grow(cb.denseV, static_cast<size_t>(B * nTiles) * tileFloats) : nullptr;
    if (dense)
        parallel(static_cast<size_t>(B * nTiles), [&](size_t it) {
            int64_t const b = static_cast<int64_t>(it) / nTiles, j0 = static_cast<int64_t>(it) % nTiles * kRowTile;
            int64_t const n = std::min(kRowTile, maxFeatRows - j0);
            int const GD = G * D;
            thread_local std::vector<float> rbuf;
            float* cK = grow(rbuf, static_cast<size_t>(kRowTile) * (RK + RV + GD)); // (kRowTile, RK)
            float* cV = cK + kRowTile * RK; // (kRowTile, RV)
            float* rows = cV + kRowTile * RV; // (kRowTile, G*D) rebuilt keys, row-major
            for (int64_t jj = 0; jj < n; ++jj)
            {
                featRow(true, b, j0 + jj, cK + jj * RK);
                featRow(false, b, j0 + jj, cV + jj * RV);
            }
            std::fill(cK + n * RK, cK + kRowTile * RK, 0.f); // rows past the store: zero keys and values
            std::fill(cV + n * RV, cV + kRowTile * RV, 0.f);
            for (int64_t jj = 0; jj < kRowTile; ++jj)
                if (post || jj >= n)
                    std::fill(rows + jj * GD, rows + (jj + 1) * GD, 0.f);
                else
                    std::memcpy(rows + jj * GD, io.kBias, sizeof(float) * GD);
            kUp.gemm(cK, RK, 0, GD, rows, GD, kRowTile, GD, RK);
            if (!post)
                for (int64_t jj = 0; jj < n; ++jj)
                    rotateHalf(rows + jj * GD, rows + jj * GD, G, D, io.ropeCos + (j0 + jj) * D, io.ropeSin + (j0 + jj) * D);
            transposeInto(rows, GD, kRowTile, GD, denseK + it * tileFloats, kRowTile);
            float* vt = denseV + it * tileFloats;
            std::fill(vt, vt + tileFloats, 0.f);
            for (int g = 0; g < G; ++g)
                vUp.gemm(cV, RV, g * D, GD, vt + static_cast<size_t>(g) * kRowTile * D, D, kRowTile, D, RV);
        });

    size_t const nItems = static_cast<size_t>(B * nBlocks * nSplit);
    parallel(nItems, [&](size_t item) {
        int64_t const split = static_cast<int64_t>(item) % nSplit;
        int64_t const blk = (static_cast<int64_t>(item) / nSplit) % nBlocks;
        int64_t const b = static_cast<int64_t>(item) / (nSplit * nBlocks);
        int64_t const t0 = blk * kQueryBlock, t1 = std::min(T, t0 + kQueryBlock), nq = t1 - t0;
        size_t const nh = static_cast<size_t>(nq) * H; // (query, head) pairs of this item
        // The item's rows (queries, accumulators, scores) are KV-head-major, row g*nqr + qi*rep + i for
        // query qi and query head g*rep + i: the rows reading one KV head's keys are contiguous, so each
        // tile product is one GEMM of nq*rep rows per KV head (a prefill block: 48), not nq GEMMs of rep
        int64_t const nqr = nq * rep;
        auto rowOf = [&](int64_t qi, int g) { return static_cast<size_t>(g * nqr + qi * rep); };
        // scores of every (query, head) of the item against a tile, or one (query, head)'s window
        size_t const scoreLen = std::max(nh * kRowTile, static_cast<size_t>(W));
        int64_t const KWp = (KW + kLanes - 1) / kLanes * kLanes;
        std::vector<float>& buf = scratch(nh * accLen + kRowTile * (KW + RVp) + scoreLen + kLanes * KWp + RK
            + static_cast<size_t>(2 * G * W * D) + (rebuildByGemm ? kRowTile * (RK + KW) : 0) + nh * D
            + (post && !dense ? nh * RK : 0));
        float* accs = buf.data();
        float* tileKey = accs + nh * accLen; // (KW, kRowTile): feature-major, the scores' right factor
        float* tileV = tileKey + kRowTile * KW; // (kRowTile, RVp): row-major, the value sums' right factor
        float* sc = tileV + kRowTile * RVp; // (nh, kRowTile) scores, then softmax weights
        float* keyRows = sc + scoreLen; // (kLanes, KWp) key rows, dequantised or rebuilt, before the transpose
        float* rowC = keyRows + kLanes * KWp; // (RK) pre-RoPE: one row of c_k
        float* ringK = rowC + RK; // (G, W, D) the ring as floats
        float* ringV = ringK + static_cast<size_t>(G) * W * D;
        float* tileC = ringV + static_cast<size_t>(G) * W * D; // (kRowTile, RK) pre-RoPE by GEMM: the tile's c_k
        float* tileRows = tileC + kRowTile * RK; // (kRowTile, G*D) its rebuilt keys, row-major
        float* qg = rebuildByGemm ? tileRows + kRowTile * KW : tileC; // (nh, D) the scaled queries, g-major
        float* qgf = qg + nh * D; // (nh, RK) post-RoPE: the queries folded through k_up, g-major
        for (int64_t qi = 0; qi < nq; ++qi)
            for (int g = 0; g < G; ++g)
            {
                size_t const from = static_cast<size_t>((b * T + t0 + qi) * H + g * rep);
                std::memcpy(qg + rowOf(qi, g) * D, qd + from * D, sizeof(float) * rep * D);
                if (post && !dense)
                    std::memcpy(qgf + rowOf(qi, g) * RK, qFeat + from * QK, sizeof(float) * rep * QK);
            }
        for (size_t x = 0; x < nh; ++x)
        {
            float* acc = accs + x * accLen;
            std::fill(acc, acc + accLen, 0.f);
            acc[kMax] = -std::numeric_limits<float>::infinity();
        }
        thread_local IntQueries intQ;
        if (intKeys)
            quantizeQueries(qgf, static_cast<int64_t>(nh), RK, int8Queries ? 8 : 0, intQ);
        // feature rows of this split that the block's last query attends
        int64_t const blockRows = std::max<int64_t>(0, P + t1 - W);
        int64_t const lo = split * splitLen, hi = std::min(blockRows, lo + splitLen);
        for (int64_t j0 = lo; j0 < hi; j0 += kRowTile)
        {
            int64_t const n = std::min(kRowTile, hi - j0);
            // the tile's keys (G*D or r_k features, kRowTile columns) and values: rebuilt once per call
            // (dense) or dequantised here
            float const* keys = dense ? denseK + (b * nTiles + j0 / kRowTile) * tileFloats : tileKey;
            float const* values = dense ? denseV + (b * nTiles + j0 / kRowTile) * tileFloats : tileV;
            bool const intTile = intKeys && j0 + n <= P; // every row in the input store
            if (!dense && rebuildByGemm) // K = RoPE(c_k @ k_up + k_bias) for the whole tile: one GEMM, one transpose
            {
                for (int64_t jj = 0; jj < n; ++jj)
                {
                    featRow(true, b, j0 + jj, tileC + jj * RK);
                    std::memcpy(tileRows + jj * KW, io.kBias, sizeof(float) * KW);
                }
                kUp.gemm(tileC, RK, 0, KW, tileRows, KW, n, KW, RK);
                for (int64_t jj = 0; jj < n; ++jj)
                    rotateHalf(tileRows + jj * KW, tileRows + jj * KW, G, D, io.ropeCos + (j0 + jj) * D,
                        io.ropeSin + (j0 + jj) * D);
                std::fill(tileRows + n * KW, tileRows + kRowTile * KW, 0.f); // rows past n: zero keys
                transposeInto(tileRows, KW, kRowTile, KW, tileKey, kRowTile);
                for (int64_t jj = 0; jj < n; ++jj)
                {
                    float* v = tileV + jj * RVp;
                    featRow(false, b, j0 + jj, v);
                    std::fill(v + RV, v + RVp, 0.f);
                }
            }
            for (int64_t jj = 0; jj < (dense || rebuildByGemm ? 0 : n); ++jj)
            {
                int64_t const j = j0 + jj;
                float* key = keyRows + (jj % kLanes) * KWp;
                float* v = tileV + jj * RVp;
                featRow(false, b, j, v);
                std::fill(v + RV, v + RVp, 0.f);
                if (intTile)
                    continue;
                if (post)
                    featRow(true, b, j, key);
                else // K_j = RoPE(c_j @ k_up + k_bias, j), every KV head at once
                {
                    featRow(true, b, j, rowC);
                    std::memcpy(key, io.kBias, sizeof(float) * G * D);
                    for (int r = 0; r < RK; ++r)
                        kUp.axpy(rowC[r], static_cast<size_t>(r) * G * D, key, G * D);
                    rotateHalf(key, key, G, D, io.ropeCos + j * D, io.ropeSin + j * D);
                }
                if (jj % kLanes == kLanes - 1 || jj == n - 1) // a block of kLanes key rows: into the
                {                                              // feature-major tile, kLanes x kLanes at a time
                    int64_t const jb = jj - jj % kLanes;
                    std::fill(keyRows + (jj % kLanes + 1) * KWp, keyRows + kLanes * KWp, 0.f); // rows past n: zero
                    for (int e0 = 0; e0 < KW; e0 += kLanes)
                    {
                        Vec blk[kLanes];
                        for (int i = 0; i < kLanes; ++i)
                            blk[i] = loadVec(keyRows + i * KWp + e0);
                        transposeBlock(blk);
                        for (int i = 0; i < kLanes && e0 + i < KW; ++i)
                            storeVec(tileKey + (e0 + i) * kRowTile + jb, blk[i]);
                    }
                }
            }
            for (int64_t jb = (n + kLanes - 1) / kLanes * kLanes; jb < (dense || rebuildByGemm || intTile ? 0 : kRowTile); jb += kLanes) // blocks past n
                for (int e = 0; e < KW; ++e)
                    std::fill(tileKey + e * kRowTile + jb, tileKey + e * kRowTile + jb + kLanes, 0.f);
            // queries before qLo see no row of this tile (prefill's causal edge); rows j <= p - W are seen
            auto validOf = [&](int64_t qi) { return std::min(n, P + t0 + qi - W - j0 + 1); };
            int64_t qLo = 0;
            while (qLo < nq && validOf(qLo) <= 0)
                ++qLo;
            if (qLo == nq)
                continue;
            // rows x0 .. x0+rows-1 of the item (KV head g's, or every head's where they read the same rows)
            auto pass = [&](size_t x0, int64_t rows, int g) {
                float* scg = sc + x0 * kRowTile;
                std::fill(scg, scg + rows * kRowTile, 0.f);
                if (intTile)
                    for (int64_t jb = 0; jb < n; jb += kLanes)
                    {
                        int64_t const at = b * S + j0 + jb;
                        intKeyScores(static_cast<int8_t const*>(io.featK) + at * ck, ck, io.featKScales + at * gk,
                            gk, std::min<int64_t>(kLanes, n - jb), intQ, static_cast<int64_t>(x0), rows, scg + jb,
                            kRowTile);
                    }
                else if (post && !dense) // every head dots the same c_k rows
                    gemmAdd(qgf + x0 * QK, QK, keys, kRowTile, scg, kRowTile, rows, kRowTile, QK);
                else // a KV head's keys serve its rep query heads of every query
                    gemmAdd(qg + x0 * D, D, keys + static_cast<int64_t>(g) * D * kRowTile, kRowTile, scg, kRowTile,
                        rows, kRowTile, D);
                for (int64_t x = 0; x < rows; ++x) // online softmax per (query, head): weights in place of scores
                {
                    float* acc = accs + (x0 + x) * accLen;
                    int64_t const qi = static_cast<int64_t>(x0 + x) % nqr / rep;
                    acc[kFeatMass] += softmaxInto(scg + x * kRowTile, kRowTile, 0, validOf(qi) - 1, acc, accLen);
                }
                if (dense) // value sums += weights @ the tile's rebuilt values of this KV head
                    gemmAdd(scg, kRowTile, values + static_cast<int64_t>(g) * kRowTile * D, D, accs + x0 * accLen + kSums,
                        static_cast<int64_t>(accLen), rows, D, n);
                else // value-feature sums += weights @ the tile's c_v rows (shared by every head)
                    gemmAdd(scg, kRowTile, values, RVp, accs + x0 * accLen + kSums + D, static_cast<int64_t>(accLen),
                        rows, RVp, n);
            };
            // post-RoPE in feature space every head reads the same rows: when every query of the item
            // sees the tile, its rows are contiguous across KV heads and both products are one GEMM of
            // nq*H rows (a decode step: 9), each loaded row of the tile feeding all of them
            if (post && !dense && qLo == 0)
                pass(0, static_cast<int64_t>(nh), -1);
            else
                for (int g = 0; g < G; ++g)
                    pass(rowOf(qLo, g), (nq - qLo) * rep, g);
        }
        if (split == nSplit - 1 && D % kPad == 0) // the window as two small GEMMs per KV head (below)
            windowByGemm(b, t0, nq, qg, accs);
        else if (split == nSplit - 1) // the window: positions p-W < j <= p, from the ring or this call
        {
            size_t const ringAt = static_cast<size_t>(b * G * W) * D, ringLen = static_cast<size_t>(G) * W * D;
            halvesToFloats(io.winK + ringAt, ringK, static_cast<int64_t>(ringLen));
            halvesToFloats(io.winV + ringAt, ringV, static_cast<int64_t>(ringLen));
            for (int64_t qi = 0; qi < nq; ++qi)
            {
                int64_t const t = t0 + qi, p = P + t, first = std::max<int64_t>(0, p - W + 1);
                for (int h = 0; h < H; ++h)
                {
                    int const g = h / rep;
                    auto keyAt = [&](int64_t j, bool value) -> float const* {
                        if (j < P)
                            return (value ? ringV : ringK) + (static_cast<size_t>(g) * W + j % W) * D;
                        return (value ? newV : newK) + ((b * T + (j - P)) * G + g) * D;
                    };
                    float const* qv = qd + ((b * T + t) * H + h) * D;
                    float m = -std::numeric_limits<float>::infinity();
                    for (int64_t j = first; j <= p; ++j)
                    {
                        sc[j - first] = dot(qv, keyAt(j, false), D);
                        m = std::max(m, sc[j - first]);
                    }
                    float* acc = accs + (rowOf(qi, g) + h % rep) * accLen;
                    rebase(acc, std::max(acc[kMax], m), accLen);
                    float const mx = acc[kMax];
                    int64_t const cnt = p - first + 1;
                    float mass = 0.f;
#pragma omp simd reduction(+ : mass)
                    for (int64_t i = 0; i < cnt; ++i)
                    {
                        sc[i] = expNonPositive(sc[i] - mx);
                        mass += sc[i];
                    }
                    acc[kMass] += mass;
                    for (int64_t j = first; j <= p; ++j)
                        axpy(sc[j - first], keyAt(j, true), acc + kSums, D);
                }
            }
        }
        if (nSplit == 1)
        {
            for (int64_t qi = 0; qi < nq; ++qi)
                for (int g = 0; g < G; ++g)
                    finishGroup(b, t0 + qi, g, accs + rowOf(qi, g) * accLen, accLen);
            return;
        }
        std::memcpy(partials + item * perItem, accs, sizeof(float) * nh * accLen);
    });
    if (nSplit == 1)
        return;
    // 5. merge the splits of each (b, block), in parallel over (b, block, KV head): even a decode step's
    //    3 items are worth the pool, each streaming its KV head's columns of v_up (fp32)
    parallel(static_cast<size_t>(B * nBlocks * G), [&](size_t x) {
        int const g = static_cast<int>(x % G);
        int64_t const blockItem = static_cast<int64_t>(x) / G;
        int64_t const blk = blockItem % nBlocks, b = blockItem / nBlocks;
        int64_t const t0 = blk * kQueryBlock, nq = std::min(T, t0 + kQueryBlock) - t0;
        std::vector<float>& buf = scratch(static_cast<size_t>(rep) * accLen);
        for (int64_t qi = 0; qi < nq; ++qi)
        {
            for (int i = 0; i < rep; ++i)
            {
                float* acc = buf.data() + static_cast<size_t>(i) * accLen;
                std::fill(acc, acc + accLen, 0.f);
                acc[kMax] = -std::numeric_limits<float>::infinity();
                for (int64_t sp = 0; sp < nSplit; ++sp)
                {
                    float* part = partials + (blockItem * nSplit + sp) * perItem
                        + static_cast<size_t>(g * nq * rep + qi * rep + i) * accLen; // the items' g-major rows
                    if (part[kMass] == 0.f)
                        continue;
                    float const m = std::max(acc[kMax], part[kMax]);
                    rebase(acc, m, accLen);
                    rebase(part, m, accLen);
                    acc[kMass] += part[kMass];
                    acc[kFeatMass] += part[kFeatMass];
                    axpy(1.f, part + kSums, acc + kSums, static_cast<int64_t>(accLen - kSums));
                }
            }
            finishGroup(b, t0 + qi, g, buf.data(), accLen);
        }
    });
}

// The self-attention form: RoPE on q and k at their positions (rotate-half, the op's tables), the new
// tokens' features (pre-RoPE c_k = x @ k_down; post-RoPE c_k = fp16(RoPE(k)) @ k_down, the key as the
// ring stores it; c_v = x @ v_down) as GEMMs over all B*T rows, then the attention above.
void biBranchSelfAttention(BiBranchShape const& s, BiBranchIO const& io, BiBranchSelfIO const& self,
    ParallelFor const& parallel)
{
    int64_t const BT = s.batch * s.tokens, P = io.past;
    int const H = s.heads, G = s.kvHeads, D = s.headDim, RK = s.rankK, RV = s.rankV;
    bool const post = s.keyMode == contract::kKeyModePostRope;
    thread_local std::vector<float> qBuf, kBuf, kHalfBuf, cKBuf, cVBuf;
    float* q = grow(qBuf, static_cast<size_t>(BT) * H * D);
    float* k = grow(kBuf, static_cast<size_t>(BT) * G * D);
    float* kHalf = post ? grow(kHalfBuf, static_cast<size_t>(BT) * G * D) : nullptr; // post: k as the ring stores it
    float* cK = grow(cKBuf, static_cast<size_t>(BT * RK));
    float* cV = grow(cVBuf, static_cast<size_t>(BT * RV));
    // rows in blocks of 8 * kMR, in parallel when the call has many; the GEMMs run over slices of
    // kSliceK inputs so that the down projection's slice stays in L1 across the block's row groups
    constexpr int64_t kRows = 8 * kMR, kSliceK = 64;
    int64_t const nBlocks = (BT + kRows - 1) / kRows;
    auto rope = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
        {
            int64_t const p = P + r % s.tokens;
            rotateHalf(io.q + r * H * D, q + r * H * D, H, D, io.ropeCos + p * D, io.ropeSin + p * D);
            rotateHalf(io.k + r * G * D, k + r * G * D, G, D, io.ropeCos + p * D, io.ropeSin + p * D);
            if (post)
                for (int e = 0; e < G * D; ++e)
                    kHalf[r * G * D + e] = Half::toFloat(Half::fromFloat(k[r * G * D + e]));
        }
    };
    // c_k or c_v columns c0 .. c1 of rows r0 .. r1
    auto project = [&](bool key, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
        int64_t const R = key ? RK : RV, n = r1 - r0;
        float* c = (key ? cK : cV) + r0 * R;
        for (int64_t r = 0; r < n; ++r)
            std::fill(c + r * R + c0, c + r * R + c1, 0.f);
        bool const fromK = key && post;
        float const* a = fromK ? kHalf + r0 * G * D : self.x + r0 * self.hidden;
        int64_t const K = fromK ? G * D : self.hidden;
        Factor const w = key ? Factor{self.kDown, self.kDownH} : Factor{self.vDown, self.vDownH};
        for (int64_t k0 = 0; k0 < K; k0 += kSliceK)
            w.gemm(a + k0, K, static_cast<size_t>(k0 * R + c0), R, c + c0, R, n, c1 - c0, std::min(kSliceK, K - k0));
    };
    if (BT <= 4)
    {
        // a decode step: one row, so the down projections are matrix-vector products reading every factor
        // (fp32, ~0.6 MB a layer, from memory at depth): split by output columns over the pool, so both
        // cores stream them
        rope(0, BT);
        constexpr int64_t kCols = 64;
        int64_t const nk = (RK + kCols - 1) / kCols, nv = (RV + kCols - 1) / kCols;
        parallel(static_cast<size_t>(nk + nv), [&](size_t i) {
            bool const key = static_cast<int64_t>(i) < nk;
            int64_t const c0 = (key ? static_cast<int64_t>(i) : static_cast<int64_t>(i) - nk) * kCols;
            project(key, 0, BT, c0, std::min<int64_t>(key ? RK : RV, c0 + kCols));
        });
    }
    else
        parallel(static_cast<size_t>(nBlocks), [&](size_t blk) {
            int64_t const r0 = static_cast<int64_t>(blk) * kRows, r1 = std::min(BT, r0 + kRows);
            rope(r0, r1);
            project(true, r0, r1, 0, RK);
            project(false, r0, r1, 0, RV);
        });
    BiBranchIO inner = io;
    inner.q = q, inner.k = k, inner.cK = cK, inner.cV = cV;
    SHRINKRT_ISA::biBranchAttention(s, inner, parallel); // this copy's, not the dispatcher
}

} // namespace SHRINKRT_ISA
} // namespace cpu
} // namespace shrinkrt
