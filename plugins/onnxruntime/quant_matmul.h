// QuantMatMulW4A8 on the CPU (docs/ops.md): Y = X @ W^T for a 4-bit group-32 layer with mins (the
// source GGUF's Q4_1 form), X quantized to int8 per block of 32 columns; behind a plain launcher with
// no ONNX Runtime types (register.cpp wraps it, a test harness can call it alike).
#pragma once

#include "bibranch_attention.h" // ParallelFor

#include <cstdint>

namespace shrinkrt
{
namespace cpu
{

// The op's attributes and the call's activation rows (B*T). gated: y = silu(p[:, :N/2]) * p[:, N/2:] of
// the product p, (rows, N/2). quantizedSums: the min meets dx * sum(xq) of a block (1) or sum(x) (0).
struct W4A8Shape
{
    int32_t inFeatures, outFeatures, gated, quantizedSums;
    int64_t rows;
};

// Pointers of one call. x and y are fp32 here (the op converts fp16 activations); scales and mins are
// fp16 bit patterns.
struct W4A8IO
{
    float const* x; // (rows, K)
    uint32_t const* codes; // (N, ceil(K/32) * 4) words: each row a little-endian stream of 4-bit codes
    uint16_t const *scales, *mins; // (N, ceil(K/32))
    float* y; // (rows, N), or (rows, N/2) gated
};

// Empty when the attributes are valid, else what is wrong (one line).
char const* checkW4A8(W4A8Shape const& s);

void quantMatMulW4A8(W4A8Shape const& s, W4A8IO const& io, ParallelFor const& parallel);

} // namespace cpu
} // namespace shrinkrt
