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
SHRINKRT_DECLARE_ISA(avx512vnni)
SHRINKRT_DECLARE_ISA(avx512)
SHRINKRT_DECLARE_ISA(avx2)
SHRINKRT_DECLARE_ISA(base)

namespace
{

// One compiled copy of the kernels
struct Copy
{
    char const* name;
    void (*attention)(BiBranchShape const&, BiBranchIO const&, ParallelFor const&);
    void (*self)(BiBranchShape const&, BiBranchIO const&, BiBranchSelfIO const&, ParallelFor const&);
    void (*matmul)(W4A8Shape const&, W4A8IO const&, ParallelFor const&);
};
#define SHRINKRT_COPY(isa, name) Copy{name, isa::biBranchAttention, isa::biBranchSelfAttention, isa::quantMatMulW4A8}

// SHRINKRT_ORT_ISA=avx512|avx2|x86-64 caps the choice at a narrower copy (tests run every copy on one
// machine; a user can rule out a suspect one); it never picks a copy the CPU cannot run.
Copy pick()
{
    char const* cap = std::getenv("SHRINKRT_ORT_ISA");
    std::string const want = cap ? cap : "";
    if (want == "x86-64")
        return SHRINKRT_COPY(base, "x86-64");
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    bool const avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (want != "avx2" && want != "avx512" && avx512 && __builtin_cpu_supports("avx512vnni"))
        return SHRINKRT_COPY(avx512vnni, "avx512vnni");
    if (want != "avx2" && avx512)
        return SHRINKRT_COPY(avx512, "avx512");
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return SHRINKRT_COPY(avx2, "avx2");
#endif
    return SHRINKRT_COPY(base, "x86-64");
}

Copy const gCopy = pick();
} // namespace

char const* isaName()
{
    return gCopy.name;
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
    if (s.queryBits != 0 && s.queryBits != 8)
        return "query_bits must be 0 or 8";
    if (s.queryBits == 8 && s.keyMode != contract::kKeyModePostRope)
        return "query_bits 8 needs key_mode 1 (it rounds the post-RoPE folded queries)";
    return "";
}

void biBranchAttention(BiBranchShape const& s, BiBranchIO const& io, ParallelFor const& parallel)
{
    gCopy.attention(s, io, parallel);
}

void biBranchSelfAttention(BiBranchShape const& s, BiBranchIO const& io, BiBranchSelfIO const& self,
    ParallelFor const& parallel)
{
    gCopy.self(s, io, self, parallel);
}

char const* checkW4A8(W4A8Shape const& s)
{
    if (s.inFeatures < 1 || s.outFeatures < 1)
        return "in_features and out_features must be >= 1";
    if (s.gated != 0 && s.gated != 1)
        return "gated must be 0 or 1";
    if (s.quantizedSums != 0 && s.quantizedSums != 1)
        return "quantized_sums must be 0 or 1";
    return s.gated && s.outFeatures % 2 ? "gated needs an even out_features (gate and up side by side)" : "";
}

void quantMatMulW4A8(W4A8Shape const& s, W4A8IO const& io, ParallelFor const& parallel)
{
    gCopy.matmul(s, io, parallel);
}

} // namespace cpu
} // namespace shrinkrt
