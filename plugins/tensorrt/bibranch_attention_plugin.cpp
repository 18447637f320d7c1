#include "bibranch_attention_plugin.h"

#include <algorithm>

using namespace nvinfer1;

namespace shrinkrt
{
namespace
{
// positions of the op's inputs/outputs: shrinkrt_ops.gen.h (op_contract.py)
using namespace contract::BiBranchAttention;
} // namespace

BiBranchAttentionConfig BiBranchAttentionPlugin::config() const
{
    return BiBranchAttentionConfig::from([this](char const* name) { return mFields[name]; });
}

BiBranchAttentionPlugin* BiBranchAttentionPlugin::create(PluginFieldCollection const* fc, std::string& error)
{
    std::unique_ptr<BiBranchAttentionPlugin> p(new BiBranchAttentionPlugin());
    if (!p->mFields.parse(fc, error))
        return nullptr;
    error = BiBranchAttentionLauncher(p->config()).check();
    return error.empty() ? p.release() : nullptr;
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
    BiBranchAttentionConfig const c = config();
    bool const quant = c.quantized();
    auto width = [&](int64_t r) { return c.storeWidth(r); };
    auto groups = [](int64_t r) { return BiBranchAttentionConfig::scaleGroups(r); };
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
    return BiBranchAttentionLauncher(config()).workspaceBytes(inputs[kQ].max.d[0]);
}

bool BiBranchAttentionPlugin::loadKernels() noexcept
{
    if (mLauncher)
        return true;
    auto launcher = std::make_unique<BiBranchAttentionLauncher>(config());
    std::string error;
    if (!launcher->load(error))
    {
        reportError("BiBranchAttention", error);
        return false;
    }
    mLauncher = std::move(launcher);
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
    BiBranchAttentionLauncher::Shape const shape{static_cast<int32_t>(inputDesc[kQ].dims.d[0]),
        static_cast<int32_t>(inputDesc[kQ].dims.d[1]), static_cast<int32_t>(inputDesc[kFeatK].dims.d[1])};
    std::string error;
    if (!mLauncher->enqueue(shape, inputs, outputs, workspace, stream, error))
    {
        reportError("BiBranchAttention", error);
        return -1;
    }
    return 0;
}

} // namespace shrinkrt
