#include "bibranch_attention_plugin.h"

#include <algorithm>

using namespace nvinfer1;

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
} // namespace

BiBranchAttentionPlugin* BiBranchAttentionPlugin::create(PluginFieldCollection const* fc, std::string& error)
{
    std::unique_ptr<BiBranchAttentionPlugin> p(new BiBranchAttentionPlugin());
    if (!p->mFields.parse(fc, error))
        return nullptr;
    auto const& f = p->mFields;
    int32_t const bits = f["bits"];
    if (bits != 16 && bits != 8 && bits != 4)
        error = "bits must be 16, 8 or 4 (got " + std::to_string(bits) + ")";
    else if (f["key_mode"] != 0 && f["key_mode"] != 1)
        error = "key_mode must be 0 (pre-RoPE) or 1 (post-RoPE)";
    else if (f["num_kv_heads"] < 1 || f["num_heads"] % f["num_kv_heads"] != 0)
        error = "num_heads must be a multiple of num_kv_heads";
    else if (f["window"] < 1)
        error = "window must be >= 1";
    else if (f["rank_k"] < 1 || f["rank_v"] < 1 || f["rank_k"] > kRankPad || f["rank_v"] > kRankPad)
        error = "rank_k and rank_v must be in 1.." + std::to_string(kRankPad);
    else
        for (auto const& name : p->kernelNames())
            if (!findKernel(name))
            {
                error = "this library has no kernel " + name
                    + " (the AOT build specializes heads/head_dim/window: see plugins/kernels/aot.py)";
                break;
            }
    return error.empty() ? p.release() : nullptr;
}

std::vector<std::string> BiBranchAttentionPlugin::kernelNames() const
{
    auto const& f = mFields;
    std::string const hgd = "h" + std::to_string(f["num_heads"]) + "g" + std::to_string(f["num_kv_heads"]) + "d"
        + std::to_string(f["head_dim"]);
    std::string const w = "w" + std::to_string(f["window"]);
    std::string const b = std::to_string(f["bits"]);
    return {"bibranch_split_b" + b + (f["key_mode"] ? "_post_" : "_pre_") + hgd + w, "bibranch_reduce_" + hgd,
        "bibranch_append_g" + std::to_string(f["num_kv_heads"]) + "d" + std::to_string(f["head_dim"]) + w,
        "feature_quant_b" + b};
}

// The input shapes against the fields (window, heads, ranks, store widths, scale widths) and against
// each other (batch, the store's capacity within the RoPE tables): a mismatch is one line naming the input,
// at build time, instead of kernels reading past their buffers. Dynamic dimensions (-1) are not judged.
int32_t BiBranchAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != getNbOutputs())
        return -1;
    auto const& f = mFields;
    int64_t const H = f["num_heads"], G = f["num_kv_heads"], D = f["head_dim"], W = f["window"];
    int64_t const rk = f["rank_k"], rv = f["rank_v"];
    bool const quant = f["bits"] < 16;
    auto width = [&](int64_t r) { return f["bits"] == 4 ? (r + 1) / 2 : r; };
    auto groups = [](int64_t r) { return (r + contract::kFeatureGroup - 1) / contract::kFeatureGroup; };
    auto dim = [&](int32_t i, int32_t axis) { return axis < in[i].desc.dims.nbDims ? in[i].desc.dims.d[axis] : -2; };
    auto check = [&](int32_t i, char const* name, int32_t axis, int64_t want, char const* what) {
        int64_t const got = dim(i, axis);
        if (got == -1 || got == want)
            return true;
        reportError("BiBranchAttention", std::string(name) + " has " + std::to_string(got) + " at axis "
                + std::to_string(axis) + ", the fields say " + what + " = " + std::to_string(want));
        return false;
    };
    int64_t const B = dim(kQ, 0), S = dim(kFeatK, 1);
    bool ok = check(kQ, "q", 2, H * D, "num_heads*head_dim") && check(kK, "k", 2, G * D, "num_kv_heads*head_dim")
        && check(kV, "v", 2, G * D, "num_kv_heads*head_dim") && check(kCK, "c_k", 2, rk, "rank_k")
        && check(kCV, "c_v", 2, rv, "rank_v");
    for (int32_t w : {kWinK, kWinV})
        ok = ok && check(w, w == kWinK ? "win_k" : "win_v", 1, G, "num_kv_heads")
            && check(w, w == kWinK ? "win_k" : "win_v", 2, W, "window")
            && check(w, w == kWinK ? "win_k" : "win_v", 3, D, "head_dim");
    ok = ok && check(kFeatK, "feat_k", 2, width(rk), "the row width of rank_k") && check(kFeatV, "feat_v", 2, width(rv),
        "the row width of rank_v") && check(kKUp, "k_up", 0, rk, "rank_k") && check(kVUp, "v_up", 0, rv, "rank_v");
    if (quant)
        ok = ok && check(kFeatKScales, "feat_k_scales", 2, groups(rk), "groups of rank_k")
            && check(kFeatVScales, "feat_v_scales", 2, groups(rv), "groups of rank_v");
    if (ok && B >= 0) // one batch for the call, the ring and the stores
        for (int32_t i : {kWinK, kWinV, kFeatK, kFeatV})
            ok = ok && check(i, "a cache input", 0, B, "the batch of q");
    if (ok && S >= 0)
        ok = check(kFeatV, "feat_v", 1, S, "the rows of feat_k") && (dim(kRopeCos, 0) < 0 || dim(kRopeCos, 0) >= S
            || (reportError("BiBranchAttention", "rope_cos has fewer rows than the feature store's capacity " + std::to_string(S)), false));
    return ok ? 0 : -1;
}

int32_t BiBranchAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != getNbOutputs())
        return -1;
    outputTypes[kY] = inputTypes[kQ];
    outputTypes[kWinKOut] = outputTypes[kWinVOut] = DataType::kHALF;
    outputTypes[kFeatKNew] = outputTypes[kFeatVNew] = inputTypes[kFeatK];
    if (nbOutputs == 7)
        outputTypes[kFeatKScalesNew] = outputTypes[kFeatVScalesNew] = DataType::kHALF;
    return 0;
}

int32_t BiBranchAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != getNbOutputs())
        return -1;
    outputs[kY] = inputs[kQ];
    outputs[kWinKOut] = inputs[kWinK];
    outputs[kWinVOut] = inputs[kWinV];
    // this call's rows: (B, T, row width of the store)
    auto rows = [&](int32_t store) {
        DimsExprs d = inputs[kQ];
        d.d[2] = inputs[store].d[2];
        return d;
    };
    outputs[kFeatKNew] = rows(kFeatK);
    outputs[kFeatVNew] = rows(kFeatV);
    if (nbOutputs == 7)
    {
        outputs[kFeatKScalesNew] = rows(kFeatKScales);
        outputs[kFeatVScalesNew] = rows(kFeatVScales);
    }
    return 0;
}

bool BiBranchAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != expectedInputs() || nbOutputs != getNbOutputs())
        return false;
    DataType const feat = mFields["bits"] == 16 ? DataType::kHALF : DataType::kINT8;
    if (pos == kPastLength)
        return isLinear(inOut[pos], DataType::kINT64);
    if (pos == kFeatK || pos == kFeatV || pos == nbInputs + kFeatKNew || pos == nbInputs + kFeatVNew)
        return isLinear(inOut[pos], feat);
    return isLinear(inOut[pos], DataType::kHALF); // activations, ring, up-projections, RoPE tables, scales
}

size_t BiBranchAttentionPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    // split partials (max, sum, window sum, feature sum) for the largest batch, plus a small dummy
    // that stands for the scales pointers of a 16-bit branch
    return partBytes(inputs[kQ].max.d[0], mFields["num_heads"], mFields["head_dim"]) + 256;
}

bool BiBranchAttentionPlugin::loadKernels() noexcept
{
    if (mKernels)
        return true;
    auto kernels = std::make_unique<KernelSet>();
    std::string error;
    if (!kernels->load(kernelNames(), error))
    {
        reportError("BiBranchAttention", error);
        return false;
    }
    mKernels = std::move(kernels);
    return true;
}

// A context gets a plugin whose kernels are loaded, or none: TensorRT then fails the context's creation
// with the reported error instead of an enqueue failing later.
IPluginV3* BiBranchAttentionPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    auto* p = static_cast<BiBranchAttentionPlugin*>(clone());
    if (p && !p->loadKernels())
    {
        delete p;
        return nullptr;
    }
    return p;
}

int32_t BiBranchAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (!loadKernels()) // an instance TensorRT runs without attaching it (the builder's, a clone) loads here
        return -1;
    auto const& f = mFields;
    bool const quant = f["bits"] < 16;
    int32_t const B = static_cast<int32_t>(inputDesc[kQ].dims.d[0]);
    int32_t T = static_cast<int32_t>(inputDesc[kQ].dims.d[1]);
    int32_t S = static_cast<int32_t>(inputDesc[kFeatK].dims.d[1]);
    int32_t RK = f["rank_k"], RV = f["rank_v"];
    int32_t CK = static_cast<int32_t>(inputDesc[kFeatK].dims.d[2]), CV = static_cast<int32_t>(inputDesc[kFeatV].dims.d[2]);
    int32_t const H = f["num_heads"], G = f["num_kv_heads"], D = f["head_dim"], W = f["window"];
    int32_t nSplits = 0, splitLen = 0;
    contract::splitPlan(S, W, nSplits, splitLen);
    auto dev = [](void const* p) { return reinterpret_cast<uint64_t>(p); };
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
    std::string error;
    auto fail = [&]() {
        reportError("BiBranchAttention", error);
        return -1;
    };
    // 1. the ring continues from the input ring (outputs are separate buffers in TensorRT)
    size_t const ringBytes = static_cast<size_t>(volume(inputDesc[kWinK].dims)) * 2;
    Driver const& drv = Driver::get();
    if (drv.cuMemcpyDtoDAsync(winK, dev(inputs[kWinK]), ringBytes, stream) != 0
        || drv.cuMemcpyDtoDAsync(winV, dev(inputs[kWinV]), ringBytes, stream) != 0)
    {
        error = "copying the window ring failed";
        return fail();
    }
    // 2. this call's feature rows, quantized as the store keeps them
    unsigned const rowsNew = static_cast<unsigned>(B) * static_cast<unsigned>(T);
    if (rowsNew > 0
        && (!fquant.launch(rowsNew, 1, 1, {&ck, &fkn, &fksn, &RK, &CK}, stream, error)
            || !fquant.launch(rowsNew, 1, 1, {&cv, &fvn, &fvsn, &RV, &CV}, stream, error)))
        return fail();
    // 3. per query token: append its key/value to the ring, split over the cache, reduce
    for (int32_t t = 0; t < T; ++t)
    {
        if (!append.launch(B * G, 1, 1, {&k, &v, &winK, &winV, &past, &t, &T}, stream, error))
            return fail();
        if (!split.launch(B * H, nSplits + 1, 1,
                {&q, &winK, &winV, &fk, &fks, &fv, &fvs, &fkn, &fksn, &fvn, &fvsn, &kUp, &kBias, &cosT, &sinT, &partMl,
                    &partW, &partC, &past, &t, &T, &S, &nSplits, &splitLen, &RK, &RV, &CK, &CV},
                stream, error))
            return fail();
        if (!reduce.launch(B * H, 1, 1, {&partMl, &partW, &partC, &vUp, &vBias, &y, &t, &T, &nSplits, &RV}, stream, error))
            return fail();
    }
    return 0;
}

} // namespace shrinkrt
