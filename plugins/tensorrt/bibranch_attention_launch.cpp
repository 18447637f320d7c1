#include "bibranch_attention_launch.h"

namespace shrinkrt
{
namespace
{
// positions of the op's inputs/outputs and the kernels' limits: shrinkrt_ops.gen.h (op_contract.py)
using namespace contract::BiBranchAttention;
using contract::kRankPad;
using contract::kSplitsPad;

size_t partBytes(int64_t batch, int64_t heads, int64_t headDim)
{
    return static_cast<size_t>(batch * heads * kSplitsPad * (2 + headDim + kRankPad)) * sizeof(float);
}

uint64_t dev(void const* p)
{
    return reinterpret_cast<uint64_t>(p);
}
} // namespace

std::string BiBranchAttentionLauncher::check() const
{
    auto const& c = mConfig;
    if (c.bits != 16 && c.bits != 8 && c.bits != 4)
        return "bits must be 16, 8 or 4 (got " + std::to_string(c.bits) + ")";
    if (c.keyMode != contract::kKeyModePreRope && c.keyMode != contract::kKeyModePostRope)
        return "key_mode must be 0 (pre-RoPE) or 1 (post-RoPE)";
    if (c.numKvHeads < 1 || c.numHeads % c.numKvHeads != 0)
        return "num_heads must be a multiple of num_kv_heads";
    if (c.window < 1)
        return "window must be >= 1";
    if (c.rankK < 1 || c.rankV < 1 || c.rankK > kRankPad || c.rankV > kRankPad)
        return "rank_k and rank_v must be in 1.." + std::to_string(kRankPad);
    for (auto const& name : kernelNames())
        if (!findKernel(name))
            return "this library has no kernel " + name
                + " (the AOT build specializes heads/head_dim/window: see plugins/kernels/aot.py)";
    return "";
}

std::vector<std::string> BiBranchAttentionLauncher::kernelNames() const
{
    auto const& c = mConfig;
    std::string const hgd
        = "h" + std::to_string(c.numHeads) + "g" + std::to_string(c.numKvHeads) + "d" + std::to_string(c.headDim);
    std::string const w = "w" + std::to_string(c.window);
    std::string const b = std::to_string(c.bits);
    return {"bibranch_split_b" + b + (c.keyMode == contract::kKeyModePostRope ? "_post_" : "_pre_") + hgd + w,
        "bibranch_reduce_" + hgd, "bibranch_append_g" + std::to_string(c.numKvHeads) + "d" + std::to_string(c.headDim) + w,
        "feature_quant_b" + b};
}

size_t BiBranchAttentionLauncher::workspaceBytes(int64_t maxBatch) const
{
    return partBytes(maxBatch, mConfig.numHeads, mConfig.headDim) + 256;
}

bool BiBranchAttentionLauncher::load(std::string& error)
{
    if (mKernels)
        return true;
    auto kernels = std::make_unique<KernelSet>();
    if (!kernels->load(kernelNames(), error))
        return false;
    mKernels = std::move(kernels);
    return true;
}

bool BiBranchAttentionLauncher::enqueue(Shape const& shape, void const* const* inputs, void* const* outputs,
    void* workspace, void* stream, std::string& error) const
{
    if (!mKernels)
    {
        error = "kernels not loaded";
        return false;
    }
    auto const& c = mConfig;
    bool const quant = c.quantized();
    int32_t const B = shape.batch, H = c.numHeads, G = c.numKvHeads, D = c.headDim, W = c.window;
    int32_t T = shape.tokens, S = shape.capacity, RK = c.rankK, RV = c.rankV;
    int32_t CK = static_cast<int32_t>(c.storeWidth(RK)), CV = static_cast<int32_t>(c.storeWidth(RV));
    int32_t nSplits = 0, splitLen = 0;
    contract::splitPlan(S, W, nSplits, splitLen);
    // workspace: [max, sum] x splits | window partial sums x D | feature partial sums x kRankPad | dummy
    uint64_t const ws = dev(workspace);
    uint64_t partMl = ws, partW = partMl + sizeof(float) * B * H * kSplitsPad * 2,
             partC = partW + sizeof(float) * B * H * kSplitsPad * D, dummy = ws + partBytes(B, H, D);
    uint64_t q = dev(inputs[kQ]), k = dev(inputs[kK]), v = dev(inputs[kV]), ck = dev(inputs[kCK]), cv = dev(inputs[kCV]);
    uint64_t fk = dev(inputs[kFeatK]), fv = dev(inputs[kFeatV]);
    uint64_t fks = quant ? dev(inputs[kFeatKScales]) : dummy, fvs = quant ? dev(inputs[kFeatVScales]) : dummy;
    uint64_t kUp = dev(inputs[kKUp]), vUp = dev(inputs[kVUp]), kBias = dev(inputs[kKBias]), vBias = dev(inputs[kVBias]);
    uint64_t cosT = dev(inputs[kRopeCos]), sinT = dev(inputs[kRopeSin]), past = dev(inputs[kPastLength]);
    uint64_t y = dev(outputs[kY]), winK = dev(outputs[kWinKOut]), winV = dev(outputs[kWinVOut]);
    uint64_t fkn = dev(outputs[kFeatKNew]), fvn = dev(outputs[kFeatVNew]);
    uint64_t fksn = quant ? dev(outputs[kFeatKScalesNew]) : dummy, fvsn = quant ? dev(outputs[kFeatVScalesNew]) : dummy;
    std::vector<std::string> const names = kernelNames();
    LoadedKernel const &split = (*mKernels)[names[0]], &reduce = (*mKernels)[names[1]],
                       &append = (*mKernels)[names[2]], &fquant = (*mKernels)[names[3]];
    // 1. the ring continues from the input ring (TensorRT's outputs are separate buffers): fp16 (B, G, W, D)
    size_t const ringBytes = static_cast<size_t>(B) * G * W * D * 2;
    Driver const& drv = Driver::get();
    if (drv.cuMemcpyDtoDAsync(winK, dev(inputs[kWinK]), ringBytes, stream) != 0
        || drv.cuMemcpyDtoDAsync(winV, dev(inputs[kWinV]), ringBytes, stream) != 0)
    {
        error = "copying the window ring failed";
        return false;
    }
    // 2. this call's feature rows, quantized as the store keeps them
    unsigned const rowsNew = static_cast<unsigned>(B) * static_cast<unsigned>(T);
    if (rowsNew > 0
        && (!fquant.launch(rowsNew, 1, 1, {&ck, &fkn, &fksn, &RK, &CK}, stream, error)
            || !fquant.launch(rowsNew, 1, 1, {&cv, &fvn, &fvsn, &RV, &CV}, stream, error)))
        return false;
    // 3. per query token: append its key/value to the ring, split over the cache, reduce
    for (int32_t t = 0; t < T; ++t)
    {
        if (!append.launch(B * G, 1, 1, {&k, &v, &winK, &winV, &past, &t, &T}, stream, error))
            return false;
        if (!split.launch(B * H, nSplits + 1, 1,
                {&q, &winK, &winV, &fk, &fks, &fv, &fvs, &fkn, &fksn, &fvn, &fvsn, &kUp, &kBias, &cosT, &sinT, &partMl,
                    &partW, &partC, &past, &t, &T, &S, &nSplits, &splitLen, &RK, &RV, &CK, &CV},
                stream, error))
            return false;
        if (!reduce.launch(B * H, 1, 1, {&partMl, &partW, &partC, &vUp, &vBias, &y, &t, &T, &nSplits, &RV}, stream, error))
            return false;
    }
    return true;
}

} // namespace shrinkrt
