// shrinkrt::QuantMatMul v1 (docs/ops.md) for TensorRT, launched by QuantMatMulLauncher: the fused
// dequant-GEMV kernel (plugins/kernels/qgemv.py) for up to 8 rows; more rows (prefill) dequantize the
// weight into the workspace (plugins/kernels/dequant.py) and multiply on tensor cores (cuBLASLt),
// or, where cuBLASLt is missing, run the GEMV in chunks of 8 rows.
#pragma once

#include "plugin_common.h"
#include "quant_matmul_launch.h"

#include <memory>

namespace shrinkrt
{

class QuantMatMulPlugin : public PluginBase<QuantMatMulPlugin>
{
public:
    static constexpr char const* kName = "QuantMatMul";
    static std::vector<std::string> fieldNames()
    {
        using namespace contract::QuantMatMul;
        return {std::begin(kAttributes), std::end(kAttributes)};
    }
    // nullptr (and `error`) when the fields are not a configuration the kernels support.
    static QuantMatMulPlugin* create(nvinfer1::PluginFieldCollection const* fc, std::string& error);

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override { return 1; }
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;

    // The fields as the launcher's configuration.
    QuantMatMulConfig config() const;

private:
    friend class PluginBase<QuantMatMulPlugin>;
    QuantMatMulPlugin() = default;
    // as BiBranchAttentionPlugin::loadKernels (and the cuBLASLt GEMM, optional)
    bool loadKernels() noexcept;
    std::unique_ptr<QuantMatMulLauncher> mLauncher; // kernels loaded (per instance and context)
};

using QuantMatMulCreator = Creator<QuantMatMulPlugin>;

} // namespace shrinkrt
