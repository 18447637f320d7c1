// BiBranchAttention on the CPU (docs/ops.md): the kernel behind a plain launcher, no ONNX Runtime
// types, so the ORT op (register.cpp) and a test harness can call it alike.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace shrinkrt
{
namespace cpu
{

// The op's attributes (docs/ops.md) and the call's sizes.
struct BiBranchShape
{
    int32_t heads, kvHeads, headDim, window, rankK, rankV, bits, keyMode;
    int32_t queryBits = 0; // BiBranchSelfAttention's query_bits (0 or 8; BiBranchAttention has no such attribute)
    int64_t batch, tokens, capacity; // B, T, S (rows of the feature stores)
};

// Pointers of one call. Float tensors are fp32 here (the op converts fp16 activations); the ring and
// the scales are fp16 bit patterns; features are int8 codes (bits 8/4) or fp16 (bits 16).
struct BiBranchIO
{
    float const *q, *k, *v, *cK, *cV, *kUp, *vUp, *kBias, *vBias, *ropeCos, *ropeSin;
    uint16_t const *winK, *winV;
    void const *featK, *featV; // (B, S, C) int8 or fp16
    uint16_t const *featKScales, *featVScales; // (B, S, ceil(r/group)), bits < 16
    int64_t past;
    float* y; // (B, T, H*D)
    uint16_t *winKOut, *winVOut; // (B, G, W, D)
    void *featKNew, *featVNew; // (B, T, C)
    uint16_t *featKScalesNew, *featVScalesNew; // (B, T, ceil(r/group)), bits < 16
    // k_up / v_up as fp16 bit patterns instead (the self-attention form's export): set, kUp / vUp are not read
    uint16_t const *kUpH = nullptr, *vUpH = nullptr;
};

// Runs `fn(i)` for i in [0, n), possibly in parallel (ONNX Runtime's intra-op pool).
using ParallelFor = std::function<void(size_t n, std::function<void(size_t)> const& fn)>;

// Empty when the shapes are valid, else what is wrong (one line).
char const* checkBiBranch(BiBranchShape const& s);

void biBranchAttention(BiBranchShape const& s, BiBranchIO const& io, ParallelFor const& parallel);

// BiBranchSelfAttention's extra inputs: x (B, T, hidden), the normed hidden state; k_down (hidden or
// G*D, r_k) by key mode; v_down (hidden, r_v); fp32, or fp16 through kDownH / vDownH. With them, io.q and io.k are before RoPE and io.cK/io.cV
// are not read: the op rotates q and k and computes the features, then attends as biBranchAttention.
struct BiBranchSelfIO
{
    float const *x, *kDown, *vDown;
    int64_t hidden;
    uint16_t const *kDownH = nullptr, *vDownH = nullptr; // fp16 down projections instead (as kUpH)
};

void biBranchSelfAttention(BiBranchShape const& s, BiBranchIO const& io, BiBranchSelfIO const& self,
    ParallelFor const& parallel);

// The instruction set the kernel copy in use was compiled for: avx512vnni, avx512, avx2 or x86-64.
char const* isaName();

// fp16 <-> fp32 as ONNX Runtime rounds (round to nearest even)
float halfToFloat(uint16_t h);
uint16_t floatToHalf(float f);

} // namespace cpu
} // namespace shrinkrt
