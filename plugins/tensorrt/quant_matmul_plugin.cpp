#include "quant_matmul_plugin.h"

using namespace nvinfer1;

namespace shrinkrt
{
namespace
{
// positions of the op's inputs: shrinkrt_ops.gen.h (op_contract.py)
using namespace contract::QuantMatMul;
} // namespace

QuantMatMulConfig QuantMatMulPlugin::config() const
{
    return QuantMatMulConfig::from([this](char const* name) { return mFields[name]; });
}

QuantMatMulPlugin* QuantMatMulPlugin::create(PluginFieldCollection const* fc, std::string& error)
{
    std::unique_ptr<QuantMatMulPlugin> p(new QuantMatMulPlugin());
    if (!p->mFields.parse(fc, error))
        return nullptr;
    error = QuantMatMulLauncher(p->config()).check();
    return error.empty() ? p.release() : nullptr;
}

size_t QuantMatMulPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    return QuantMatMulLauncher(config()).workspaceBytes(volume(inputs[kX].max) / mFields["in_features"]);
}

// The packed weight's shapes against the fields (docs/ops.md: codes, scales and zero points per output row,
// widths from in_features, bits and group_size) and X's last dimension: a mismatch is one line naming the
// input, at build time, instead of the kernels reading past a buffer. Dynamic dimensions (-1) are not judged.
int32_t QuantMatMulPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
        return -1;
    QuantMatMulConfig const c = config();
    auto check = [&](int32_t i, char const* name, int32_t axis, int64_t want, char const* what) {
        auto const& d = in[i].desc.dims;
        int64_t const got = axis < d.nbDims ? d.d[axis] : -2;
        if (got == -1 || got == want)
            return true;
        reportError("QuantMatMul", std::string(name) + " has " + std::to_string(got) + " at axis " + std::to_string(axis)
                + ", the fields say " + what + " = " + std::to_string(want));
        return false;
    };
    int32_t const lastX = in[kX].desc.dims.nbDims - 1;
    bool const ok = check(kX, "X", lastX, c.inFeatures, "in_features")
        && check(kCodes, "codes", 0, c.outFeatures, "out_features")
        && check(kCodes, "codes", 1, c.codeWords(), "ceil(in_features/32)*bits")
        && check(kScales, "scales", 0, c.outFeatures, "out_features")
        && check(kScales, "scales", 1, c.groups(), "ceil(in_features/group_size)")
        && check(kZeros, "zeros", 0, c.outFeatures, "out_features")
        && check(kZeros, "zeros", 1, c.zeroCols(), c.hasMins ? "ceil(in_features/group_size)" : "ceil(groups*bits/32)")
        && check(kOutlierRowptr, "outlier_rowptr", 0, c.outFeatures + 1, "out_features+1");
    return ok ? 0 : -1;
}

int32_t QuantMatMulPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs != kNbInputs)
        return -1;
    outputTypes[0] = inputTypes[kX];
    return 0;
}

int32_t QuantMatMulPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1 || inputs[kX].nbDims < 2)
        return -1;
    outputs[0] = inputs[kX];
    outputs[0].d[outputs[0].nbDims - 1] = exprBuilder.constant(mFields["out_features"]);
    return 0;
}

bool QuantMatMulPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
        return false;
    switch (pos)
    {
    case kX:
    case kScales:
    case kOutlierVals: return isLinear(inOut[pos], DataType::kHALF);
    case kZeros: return isLinear(inOut[pos], mFields["has_mins"] ? DataType::kHALF : DataType::kINT32);
    case kCodes:
    case kOutlierRowptr:
    case kOutlierCols: return isLinear(inOut[pos], DataType::kINT32);
    default: return isLinear(inOut[pos], DataType::kHALF); // Y
    }
}

bool QuantMatMulPlugin::loadKernels() noexcept
{
    if (mLauncher)
        return true;
    auto launcher = std::make_unique<QuantMatMulLauncher>(config());
    std::string error;
    if (!launcher->load(error))
    {
        reportError("QuantMatMul", error);
        return false;
    }
    mLauncher = std::move(launcher);
    return true;
}

// A context gets a plugin whose kernels are loaded, or none (TensorRT fails the context's creation).
IPluginV3* QuantMatMulPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    auto* p = static_cast<QuantMatMulPlugin*>(clone());
    if (p && !p->loadKernels())
    {
        delete p;
        return nullptr;
    }
    return p;
}

int32_t QuantMatMulPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    if (!loadKernels()) // an instance TensorRT runs without attaching it (the builder's, a clone) loads here
        return -1;
    std::string error;
    if (!mLauncher->enqueue(volume(inputDesc[kX].dims) / mFields["in_features"], inputs, outputs[0], workspace, stream,
            error))
    {
        reportError("QuantMatMul", error);
        return -1;
    }
    return 0;
}

} // namespace shrinkrt
