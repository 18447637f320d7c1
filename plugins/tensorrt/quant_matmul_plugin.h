// shrinkrt::QuantMatMul v1 (docs/ops.md): Y = X @ W^T for an LLM-MQ packed weight: the fused
// dequant-GEMV kernel (plugins/kernels/qgemv.py) for up to 8 rows; more rows (prefill) dequantize the
// weight into the workspace (plugins/kernels/dequant.py) and multiply on tensor cores (cuBLASLt),
// or, where cuBLASLt is missing, run the GEMV in chunks of 8 rows.
#pragma once

#include "cublaslt_gemm.h"
#include "kernel_images.h"
#include "plugin_common.h"

#include <memory>

namespace shrinkrt
{

class QuantMatMulPlugin : public nvinfer1::IPluginV3,
                          public nvinfer1::IPluginV3OneCore,
                          public nvinfer1::IPluginV3OneBuild,
                          public nvinfer1::IPluginV3OneRuntime
{
public:
    static std::vector<std::string> fieldNames() { return {"bits", "group_size", "in_features", "out_features"}; }
    // nullptr (and `error`) when the fields are not a configuration the kernels support.
    static QuantMatMulPlugin* create(nvinfer1::PluginFieldCollection const* fc, std::string& error);

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;
    // IPluginV3OneCore
    char const* getPluginName() const noexcept override { return "QuantMatMul"; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
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
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.values(); }

    // The kernel specialization for a call with M activation rows (M <= 8 per launch).
    std::string kernelName(int64_t m) const;
    std::string dequantName() const;

private:
    QuantMatMulPlugin() : mFields(fieldNames()) {}
    IntFields mFields;
    std::unique_ptr<KernelSet> mKernels;
    std::unique_ptr<CublasLtGemm> mGemm; // prefill (M > 8): dequant kernel + cuBLASLt; null: chunked GEMV
};

class QuantMatMulCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return mFields.specs(); }
    char const* getPluginName() const noexcept override { return "QuantMatMul"; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    IntFields mFields{QuantMatMulPlugin::fieldNames()};
};

} // namespace shrinkrt
