#include "quant_matmul_plugin.h"

using namespace nvinfer1;

namespace shrinkrt
{
namespace
{
// positions of the op's inputs and the kernels' tiles: shrinkrt_ops.gen.h (op_contract.py)
using namespace contract::QuantMatMul;
using contract::kDequantBlockK;
using contract::kDequantBlockN;
constexpr int64_t kMaxRows = contract::kQgemvMaxRows; // the widest GEMV specialization
struct dim3Like
{
    unsigned x, y;
};
} // namespace

QuantMatMulPlugin* QuantMatMulPlugin::create(PluginFieldCollection const* fc, std::string& error)
{
    std::unique_ptr<QuantMatMulPlugin> p(new QuantMatMulPlugin());
    if (!p->mFields.parse(fc, error))
        return nullptr;
    int32_t const bits = p->mFields["bits"], group = p->mFields["group_size"];
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        error = "bits must be 2, 3, 4 or 8 (got " + std::to_string(bits) + ")";
    else if (group != 64 && group != 128)
        error = "group_size must be 64 or 128 (got " + std::to_string(group) + ")";
    else if (p->mFields["in_features"] < 1 || p->mFields["out_features"] < 1)
        error = "in_features and out_features must be positive";
    else if (!findKernel(p->kernelName(1)))
        error = "this library has no kernel " + p->kernelName(1);
    return error.empty() ? p.release() : nullptr;
}

std::string QuantMatMulPlugin::kernelName(int64_t m) const
{
    int const pad = m <= 2 ? 2 : (m <= 4 ? 4 : 8);
    // Outliers are device data: the o1 kernel also serves layers without any (rowptr all zero).
    return "qgemv_b" + std::to_string(mFields["bits"]) + "_g" + std::to_string(mFields["group_size"]) + "_m"
        + std::to_string(pad) + "_o1";
}

std::string QuantMatMulPlugin::dequantName() const
{
    return "dequant_b" + std::to_string(mFields["bits"]) + "_g" + std::to_string(mFields["group_size"]);
}

size_t QuantMatMulPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    // the dense FP16 weight for prefill, when a call can have more rows than the GEMV takes
    int64_t const maxRows = volume(inputs[kX].max) / mFields["in_features"];
    return maxRows > kMaxRows ? static_cast<size_t>(mFields["out_features"]) * mFields["in_features"] * 2 : 0;
}

int32_t QuantMatMulPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != 1)
        return -1;
    if (in[kX].desc.dims.d[in[kX].desc.dims.nbDims - 1] != mFields["in_features"]
        && in[kX].desc.dims.d[in[kX].desc.dims.nbDims - 1] != -1)
    {
        reportError("QuantMatMul", "X's last dimension is not in_features");
        return -1;
    }
    return 0;
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
    case kCodes:
    case kZeros:
    case kOutlierRowptr:
    case kOutlierCols: return isLinear(inOut[pos], DataType::kINT32);
    default: return isLinear(inOut[pos], DataType::kHALF); // Y
    }
}

bool QuantMatMulPlugin::loadKernels() noexcept
{
    if (mKernels)
        return true;
    auto kernels = std::make_unique<KernelSet>();
    std::string error;
    if (!kernels->load({kernelName(2), kernelName(4), kernelName(8), dequantName()}, error))
    {
        reportError("QuantMatMul", error);
        return false;
    }
    mKernels = std::move(kernels);
    mGemm = std::make_unique<CublasLtGemm>();
    if (!mGemm->load(error))
        mGemm.reset(); // prefill runs the GEMV in chunks: correct, without tensor cores
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
    Dims const& xd = inputDesc[kX].dims;
    int32_t K = mFields["in_features"], N = mFields["out_features"];
    int64_t const rows = volume(xd) / K;
    int32_t G = inputDesc[kScales].dims.d[1], words = inputDesc[kCodes].dims.d[1], zwords = inputDesc[kZeros].dims.d[1];
    int32_t strideX = K, strideY = N;
    auto dev = [](void const* p) { return reinterpret_cast<uint64_t>(p); };
    uint64_t codes = dev(inputs[kCodes]), scales = dev(inputs[kScales]), zeros = dev(inputs[kZeros]);
    uint64_t rowptr = dev(inputs[kOutlierRowptr]), cols = dev(inputs[kOutlierCols]), vals = dev(inputs[kOutlierVals]);
    std::string error;
    if (rows > kMaxRows && mGemm && workspace)
    {
        uint64_t w = dev(workspace);
        dim3Like const grid{static_cast<unsigned>((N + kDequantBlockN - 1) / kDequantBlockN),
            static_cast<unsigned>((K + kDequantBlockK - 1) / kDequantBlockK)};
        if (!(*mKernels)[dequantName()].launch(grid.x, grid.y, 1,
                {&codes, &scales, &zeros, &rowptr, &cols, &vals, &w, &N, &K, &G, &words, &zwords}, stream, error)
            || !mGemm->run(dev(inputs[kX]), w, dev(outputs[0]), rows, N, K, stream, error))
        {
            reportError("QuantMatMul", error);
            return -1;
        }
        return 0;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) // chunks of kMaxRows rows through the GEMV
    {
        int32_t M = static_cast<int32_t>(std::min(kMaxRows, rows - r0));
        uint64_t x = dev(inputs[kX]) + 2 * r0 * K, y = dev(outputs[0]) + 2 * r0 * N;
        std::vector<void*> args{&x, &codes, &scales, &zeros, &rowptr, &cols, &vals, &y, &M, &N, &K, &G, &words,
            &zwords, &strideX, &strideY};
        unsigned const grid = static_cast<unsigned>((N + contract::kQgemvBlockN - 1) / contract::kQgemvBlockN);
        if (!(*mKernels)[kernelName(M)].launch(grid, 1, 1, args, stream, error))
        {
            reportError("QuantMatMul", error);
            return -1;
        }
    }
    return 0;
}

} // namespace shrinkrt
