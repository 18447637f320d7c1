// BiBranchAttention's entry points: shape checks, fp16 conversion, and the pick of the kernel copy
// compiled for this CPU (bibranch_attention.cpp is built once per instruction set, CMakeLists.txt).
#include "bibranch_attention.h"
#include "quant_matmul.h"

#include "half.h"
#include "shrinkrt_ops.gen.h"

#include <cstdlib>
#include <string>

namespace shrinkrt
{
namespace cpu
{
#define SHRINKRT_DECLARE_ISA(isa)                                                                                  \
    namespace isa                                                                                                  \
    {                                                                                                              \
    void biBranchAttention(BiBranchShape const& s, BiBranchIO const& io, ParallelFor const& parallel);            \
    void biBranchSelfAttention(                                                                                    \
        BiBranchShape const& s, BiBranchIO const& io, BiBranchSelfIO const& self, ParallelFor const& parallel);   \
    void quantMatMulW4A8(W4A8Shape const& s, W4A8IO const& io, ParallelFor const& parallel);                      \
    }
SHRINKRT_DECLARE_ISA(avx512)
SHRINKRT_DECLARE_ISA(avx2)
SHRINKRT_DECLARE_ISA(base)

namespace
{

using Kernel = void (*)(BiBranchShape const&, BiBranchIO const&, ParallelFor const&);
using SelfKernel = void (*)(BiBranchShape const&, BiBranchIO const&, BiBranchSelfIO const&, ParallelFor const&);

// SHRINKRT_ORT_ISA=avx2|x86-64 caps the choice at a narrower copy (tests run every copy on one
// machine; a user can rule out a suspect one); it never picks a copy the CPU cannot run.
Kernel pick()
{
    char const* cap = std::getenv("SHRINKRT_ORT_ISA");
    std::string const want = cap ? cap : "";
    if (want == "x86-64")
        return base::biBranchAttention;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (want != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq"))
        return avx512::biBranchAttention;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return avx2::biBranchAttention;
#endif
    return base::biBranchAttention;
}

Kernel const gKernel = pick();
SelfKernel const gSelfKernel = gKernel == avx512::biBranchAttention ? avx512::biBranchSelfAttention
    : gKernel == avx2::biBranchAttention                           ? avx2::biBranchSelfAttention
                                                                   : base::biBranchSelfAttention;
using MatMulKernel = void (*)(W4A8Shape const&, W4A8IO const&, ParallelFor const&);
MatMulKernel const gMatMulKernel = gKernel == avx512::biBranchAttention ? avx512::quantMatMulW4A8
    : gKernel == avx2::biBranchAttention                                ? avx2::quantMatMulW4A8
                                                                        : base::quantMatMulW4A8;
} // namespace

char const* isaName()
{
    return gKernel == avx512::biBranchAttention ? "avx512" : gKernel == avx2::biBranchAttention ? "avx2" : "x86-64";
}

float halfToFloat(uint16_t h)
{
    return Half::toFloat(h);
}

uint16_t floatToHalf(float f)
{
    return Half::fromFloat(f);
}

char const* checkBiBranch(BiBranchShape const& s)
{
    if (s.heads < 1 || s.kvHeads < 1 || s.heads % s.kvHeads != 0)
        return "num_heads must be a positive multiple of num_kv_heads";
    if (s.headDim < 2 || s.headDim % 2 != 0)
        return "head_dim must be even";
    if (s.window < 1)
        return "window must be >= 1";
    if (s.rankK < 1 || s.rankV < 1)
        return "rank_k and rank_v must be >= 1";
    if (s.bits != 16 && s.bits != 8 && s.bits != 4)
        return "bits must be 16, 8 or 4";
    if (s.keyMode != contract::kKeyModePreRope && s.keyMode != contract::kKeyModePostRope)
        return "key_mode must be 0 (pre-RoPE) or 1 (post-RoPE)";
    return "";
}

void biBranchAttention(BiBranchShape const& s, BiBranchIO const& io, ParallelFor const& parallel)
{
    gKernel(s, io, parallel);
}

void biBranchSelfAttention(BiBranchShape const& s, BiBranchIO const& io, BiBranchSelfIO const& self,
    ParallelFor const& parallel)
{
    gSelfKernel(s, io, self, parallel);
}

char const* checkW4A8(W4A8Shape const& s)
{
    return s.inFeatures < 1 || s.outFeatures < 1 ? "in_features and out_features must be >= 1" : "";
}

void quantMatMulW4A8(W4A8Shape const& s, W4A8IO const& io, ParallelFor const& parallel)
{
    gMatMulKernel(s, io, parallel);
}

} // namespace cpu
} // namespace shrinkrt
