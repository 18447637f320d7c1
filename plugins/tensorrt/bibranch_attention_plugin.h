// shrinkrt::BiBranchAttention v1 (docs/ops.md) for TensorRT: fields, shapes, formats and lifecycle; the
// kernels of plugins/kernels/bibranch_attn.py are launched by BiBranchAttentionLauncher.
#pragma once

#include "bibranch_attention_launch.h"
#include "plugin_common.h"

#include <memory>

namespace shrinkrt
{

class BiBranchAttentionPlugin : public PluginBase<BiBranchAttentionPlugin>
{
public:
    static constexpr char const* kName = "BiBranchAttention";
    static std::vector<std::string> fieldNames()
    {
        using namespace contract::BiBranchAttention;
        return {std::begin(kAttributes), std::end(kAttributes)};
    }
    // nullptr (and `error`) when the fields are not a configuration the kernels support.
    static BiBranchAttentionPlugin* create(nvinfer1::PluginFieldCollection const* fc, std::string& error);

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
    int32_t getNbOutputs() const noexcept override { return config().numOutputs(); }
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    // IPluginV3OneRuntime
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;

    // The fields as the launcher's configuration.
    BiBranchAttentionConfig config() const;
    int32_t expectedInputs() const { return config().numInputs(); }

private:
    friend class PluginBase<BiBranchAttentionPlugin>;
    BiBranchAttentionPlugin() = default;
    // loads this instance's kernels if not yet loaded (attachToContext, or the first enqueue of an
    // instance TensorRT runs without attaching it); false, with the error reported, when they cannot be
    bool loadKernels() noexcept;
    std::unique_ptr<BiBranchAttentionLauncher> mLauncher; // kernels loaded (per instance and context)
};

using BiBranchAttentionCreator = Creator<BiBranchAttentionPlugin>;

} // namespace shrinkrt
