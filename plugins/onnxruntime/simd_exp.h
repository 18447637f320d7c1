// A vectorisable e^x for the kernel copies (bibranch_attention.cpp, quant_matmul.cpp): each file is
// compiled once per instruction set, so this lives in that copy's namespace (SHRINKRT_ISA).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>

#ifndef SHRINKRT_ISA
#define SHRINKRT_ISA base
#endif

namespace shrinkrt
{
namespace cpu
{
namespace SHRINKRT_ISA
{
// e^x for x <= 0 in a form the `omp simd` loops vectorise (std::exp is a scalar libm call, and a decode
// step at depth takes one per feature row and head): Cody-Waite reduction by ln 2, the Cephes expf
// polynomial (about 1 ulp), 2^n put into the exponent bits. Below -87 the result is ~1e-38, not 0:
// callers zero masked entries themselves.
inline float expNonPositive(float x)
{
    x = std::max(x, -87.f);
    float const n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f; // round to nearest: 1.5 * 2^23
    float const r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t const e = (static_cast<int32_t>(n) + 127) << 23;
    float twoN;
    std::memcpy(&twoN, &e, sizeof twoN);
    return p * twoN;
}

// x * sigmoid(x) (SiLU) through expNonPositive: e = e^-|x|, sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below
inline float silu(float x)
{
    float const e = expNonPositive(-std::fabs(x));
    return x * (x >= 0.f ? 1.f : e) / (1.f + e);
}

} // namespace SHRINKRT_ISA
} // namespace cpu
} // namespace shrinkrt
