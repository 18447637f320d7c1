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
#include "shrinkrt_ops.gen.h"

#include <algorithm>
#include <cmath>
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

int64_t rowWidth(int r, int bits)
{
    return bits == 4 ? (r + 1) / 2 : r;
}

int64_t nGroups(int r)
{
    return (r + kGroup - 1) / kGroup;
}

// One stored row -> r floats.
inline void dequantRow(void const* codes, uint16_t const* scales, int r, int bits, float* out)
{
    if (bits == 16)
    {
        auto const* h = static_cast<uint16_t const*>(codes);
        for (int i = 0; i < r; ++i)
            out[i] = Half::toFloat(h[i]);
        return;
    }
    auto const* c = static_cast<int8_t const*>(codes);
    for (int g0 = 0; g0 < r; g0 += kGroup)
    {
        float const s = Half::toFloat(scales[g0 / kGroup]);
        int const end = std::min(r, g0 + kGroup);
        if (bits == 8)
        {
#pragma omp simd
            for (int i = g0; i < end; ++i)
                out[i] = static_cast<float>(c[i]) * s;
            continue;
        }
        int const pairs = (end - g0) / 2; // whole bytes: low nibble = even feature, sign by shifts
        int8_t const* bytes = c + g0 / 2;
        float* o = out + g0;
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
    float const f = a[kMax] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(a[kMax] - m);
    a[kMax] = m;
    a[kMass] *= f;
    a[kFeatMass] *= f;
    scale(f, a + kSums, static_cast<int64_t>(len - kSums));
}

// Per-thread scratch, grown once and reused by every call (no allocation per decode step).
// Per-call arrays of the calling thread (this call's rows, the queries, the split partials), also
// grown once: a decode step allocates nothing.
struct CallBuffers
{
    std::vector<float> newCK, newCV, newK, newV, qd, qf, partials;
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
    // 3. queries, scaled (qd); post-RoPE also folded through their KV head's key up-projection (qf)
    int const QK = post ? RK : D; // width of what a query dots a feature row with
    float* qd = grow(cb.qd, static_cast<size_t>(B * T * H * D));
    float* qf = post ? grow(cb.qf, static_cast<size_t>(B * T * H * RK)) : nullptr;
    light(static_cast<size_t>(B * T * H), [&](size_t bth) {
        int const g = static_cast<int>(bth % H) / rep;
        float* q = qd + bth * D;
        for (int d = 0; d < D; ++d)
            q[d] = io.q[bth * D + d] * qScale;
        if (post)
            for (int r = 0; r < RK; ++r)
                qf[bth * RK + r] = dot(q, io.kUp + static_cast<size_t>(r) * G * D + g * D, D);
    });
    float const* qFeat = post ? qf : qd;

    // 4. attention: items (b, query block, split), each over every head: a feature row is shared by
    //    all KV heads (c is per token), so it is dequantised once per item
    int64_t const nBlocks = (T + kQueryBlock - 1) / kQueryBlock;
    int64_t const maxFeatRows = std::max<int64_t>(0, P + T - W); // rows the last query attends
    int64_t nSplit = std::max<int64_t>(1, (kTargetItems + B * nBlocks - 1) / (B * nBlocks));
    nSplit = std::max<int64_t>(1, std::min(nSplit, maxFeatRows / kMinRowsPerSplit));
    int64_t const splitLen = std::max<int64_t>(1, (maxFeatRows + nSplit - 1) / nSplit);
    size_t const accLen = 3 + D + RV;
    size_t const perItem = static_cast<size_t>(kQueryBlock * H) * accLen;
    int const KW = post ? RK : G * D; // a tile row: c_k (post-RoPE) or the rebuilt keys of every KV head
    float* partials = nSplit > 1 ? grow(cb.partials, static_cast<size_t>(B * nBlocks * nSplit) * perItem) : nullptr;

    // y = (window sums + feature sums @ v_up + feature mass * v_bias) / mass
    auto finish = [&](int64_t b, int64_t t, int h, float const* a) {
        int const g = h / rep;
        float* y = io.y + ((b * T + t) * H + h) * D;
        float const* c = a + kSums + D;
        for (int d = 0; d < D; ++d)
            y[d] = a[kSums + d] + a[kFeatMass] * io.vBias[g * D + d];
        for (int r = 0; r < RV; ++r)
            axpy(c[r], io.vUp + static_cast<size_t>(r) * G * D + g * D, y, D);
        scale(1.f / a[kMass], y, D);
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

    size_t const nItems = static_cast<size_t>(B * nBlocks * nSplit);
    parallel(nItems, [&](size_t item) {
        int64_t const split = static_cast<int64_t>(item) % nSplit;
        int64_t const blk = (static_cast<int64_t>(item) / nSplit) % nBlocks;
        int64_t const b = static_cast<int64_t>(item) / (nSplit * nBlocks);
        int64_t const t0 = blk * kQueryBlock, t1 = std::min(T, t0 + kQueryBlock), nq = t1 - t0;
        size_t const nh = static_cast<size_t>(nq) * H; // (query, head) pairs of this item
        std::vector<float>& buf = scratch(nh * accLen + kRowTile * (KW + RV) + kRowTile + RK
            + static_cast<size_t>(2 * G * W * D) + W);
        float* accs = buf.data();
        float* tileKey = accs + nh * accLen; // (kRowTile, KW)
        float* tileV = tileKey + kRowTile * KW; // (kRowTile, RV)
        float* sc = tileV + kRowTile * RV; // (kRowTile) scores of one (query, head)
        float* rowC = sc + kRowTile; // (RK) pre-RoPE: one dequantised row
        float* ringK = rowC + RK; // (G, W, D) the ring as floats
        float* ringV = ringK + static_cast<size_t>(G) * W * D;
        for (size_t x = 0; x < nh; ++x)
        {
            float* acc = accs + x * accLen;
            std::fill(acc, acc + accLen, 0.f);
            acc[kMax] = -std::numeric_limits<float>::infinity();
        }
        // feature rows of this split that the block's last query attends
        int64_t const blockRows = std::max<int64_t>(0, P + t1 - W);
        int64_t const lo = split * splitLen, hi = std::min(blockRows, lo + splitLen);
        int const half = D / 2;
        for (int64_t j0 = lo; j0 < hi; j0 += kRowTile)
        {
            int64_t const n = std::min(kRowTile, hi - j0);
            for (int64_t jj = 0; jj < n; ++jj)
            {
                int64_t const j = j0 + jj;
                float* key = tileKey + jj * KW;
                if (post)
                    featRow(true, b, j, key);
                else // K_j = RoPE(c_j @ k_up + k_bias, j), every KV head at once
                {
                    featRow(true, b, j, rowC);
                    std::memcpy(key, io.kBias, sizeof(float) * G * D);
                    for (int r = 0; r < RK; ++r)
                        axpy(rowC[r], io.kUp + static_cast<size_t>(r) * G * D, key, G * D);
                    float const* cs = io.ropeCos + j * D;
                    float const* sn = io.ropeSin + j * D;
                    for (int g = 0; g < G; ++g)
                    {
                        float* kg = key + g * D;
                        for (int d = 0; d < half; ++d)
                        {
                            float const x1 = kg[d], x2 = kg[d + half];
                            kg[d] = x1 * cs[d] - x2 * sn[d];
                            kg[d + half] = x2 * cs[d + half] + x1 * sn[d + half];
                        }
                    }
                }
                featRow(false, b, j, tileV + jj * RV);
            }
            for (int64_t qi = 0; qi < nq; ++qi)
            {
                int64_t const t = t0 + qi;
                int64_t const valid = std::min(n, P + t - W - j0 + 1); // rows j <= p - W
                if (valid <= 0)
                    continue;
                for (int h = 0; h < H; ++h)
                {
                    float const* qv = qFeat + ((b * T + t) * H + h) * QK;
                    int const off = post ? 0 : (h / rep) * D;
                    float m = -std::numeric_limits<float>::infinity();
                    for (int64_t jj = 0; jj < valid; ++jj)
                    {
                        sc[jj] = dot(qv, tileKey + jj * KW + off, QK);
                        m = std::max(m, sc[jj]);
                    }
                    float* acc = accs + (qi * H + h) * accLen;
                    rebase(acc, std::max(acc[kMax], m), accLen);
                    float* c = acc + kSums + D;
                    for (int64_t jj = 0; jj < valid; ++jj)
                    {
                        float const p = std::exp(sc[jj] - acc[kMax]);
                        acc[kMass] += p;
                        acc[kFeatMass] += p;
                        axpy(p, tileV + jj * RV, c, RV);
                    }
                }
            }
        }
        if (split == nSplit - 1) // the window: positions p-W < j <= p, from the ring or this call
        {
            size_t const ringAt = static_cast<size_t>(b * G * W) * D, ringLen = static_cast<size_t>(G) * W * D;
            for (size_t x = 0; x < ringLen; ++x)
            {
                ringK[x] = Half::toFloat(io.winK[ringAt + x]);
                ringV[x] = Half::toFloat(io.winV[ringAt + x]);
            }
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
                    float* acc = accs + (qi * H + h) * accLen;
                    rebase(acc, std::max(acc[kMax], m), accLen);
                    for (int64_t j = first; j <= p; ++j)
                    {
                        float const e = std::exp(sc[j - first] - acc[kMax]);
                        acc[kMass] += e;
                        axpy(e, keyAt(j, true), acc + kSums, D);
                    }
                }
            }
        }
        if (nSplit == 1)
        {
            for (int64_t qi = 0; qi < nq; ++qi)
                for (int h = 0; h < H; ++h)
                    finish(b, t0 + qi, h, accs + (qi * H + h) * accLen);
            return;
        }
        std::memcpy(partials + item * perItem, accs, sizeof(float) * nh * accLen);
    });
    if (nSplit == 1)
        return;
    // 5. merge the splits of each (b, block), in parallel over (b, block, head)
    light(static_cast<size_t>(B * nBlocks * H), [&](size_t x) {
        int const h = static_cast<int>(x % H);
        int64_t const blockItem = static_cast<int64_t>(x) / H;
        int64_t const blk = blockItem % nBlocks, b = blockItem / nBlocks;
        int64_t const t0 = blk * kQueryBlock, nq = std::min(T, t0 + kQueryBlock) - t0;
        std::vector<float>& buf = scratch(accLen);
        float* acc = buf.data();
        for (int64_t qi = 0; qi < nq; ++qi)
        {
            std::fill(acc, acc + accLen, 0.f);
            acc[kMax] = -std::numeric_limits<float>::infinity();
            for (int64_t sp = 0; sp < nSplit; ++sp)
            {
                float* part = partials + (blockItem * nSplit + sp) * perItem + (qi * H + h) * accLen;
                if (part[kMass] == 0.f)
                    continue;
                float const m = std::max(acc[kMax], part[kMax]);
                rebase(acc, m, accLen);
                rebase(part, m, accLen);
                acc[kMass] += part[kMass];
                acc[kFeatMass] += part[kFeatMass];
                axpy(1.f, part + kSums, acc + kSums, static_cast<int64_t>(accLen - kSums));
            }
            finish(b, t0 + qi, h, acc);
        }
    });
}

} // namespace SHRINKRT_ISA
} // namespace cpu
} // namespace shrinkrt
