// shrinkrt::BiBranchAttention's kernels behind a plain launcher (the TensorRT samples' shape): which
// specializations a configuration needs, the workspace layout, the argument marshalling, the grids and the
// cache update, over device pointers and a CUstream. No TensorRT type appears here, so the launch glue is
// built and run (through tests/fake_libcuda.c) where TensorRT's headers are absent; the IPluginV3 class in
// bibranch_attention_plugin.cpp only adapts TensorRT's fields, shapes and lifecycle to it.
#pragma once

#include "kernel_images.h"
#include "shrinkrt_ops.gen.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace shrinkrt
{

// The op's attributes (docs/ops.md).
struct BiBranchAttentionConfig
{
    int32_t numHeads, numKvHeads, headDim, window, rankK, rankV, bits, keyMode;

    // from a lookup by attribute name (contract::BiBranchAttention::kAttributes)
    template <class Get>
    static BiBranchAttentionConfig from(Get get)
    {
        return {get("num_heads"), get("num_kv_heads"), get("head_dim"), get("window"), get("rank_k"), get("rank_v"),
            get("bits"), get("key_mode")};
    }
    bool quantized() const { return bits < 16; }
    // a 16-bit feature branch has no scales: the last kUnscaledDrop inputs and outputs are absent
    int32_t numInputs() const { return contract::BiBranchAttention::kNbInputs - (quantized() ? 0 : contract::kUnscaledDrop); }
    int32_t numOutputs() const { return contract::BiBranchAttention::kNbOutputs - (quantized() ? 0 : contract::kUnscaledDrop); }
    int64_t storeWidth(int64_t rank) const { return bits == 4 ? (rank + 1) / 2 : rank; } // bytes (or halves) per row
    static int64_t scaleGroups(int64_t rank) { return (rank + contract::kFeatureGroup - 1) / contract::kFeatureGroup; }
};

class BiBranchAttentionLauncher
{
public:
    explicit BiBranchAttentionLauncher(BiBranchAttentionConfig const& config) : mConfig(config) {}

    // "" when the kernels support this configuration and this library holds its specializations, else why not
    std::string check() const;
    // the specializations it launches: split, reduce, append, feature quant
    std::vector<std::string> kernelNames() const;
    // split partials (max, sum, window sum, feature sum) for `maxBatch`, plus a small dummy that stands for
    // the scales pointers of a 16-bit branch
    size_t workspaceBytes(int64_t maxBatch) const;

    // loads the kernels into the current CUDA context (once: later calls return true)
    bool load(std::string& error);
    bool loaded() const { return mKernels != nullptr; }

    // One call: `batch` x `tokens` query tokens at `past_length` (device int64, per batch row), a feature store
    // of `capacity` rows. inputs/outputs are device pointers in docs/ops.md order (numInputs()/numOutputs()).
    struct Shape
    {
        int32_t batch, tokens, capacity;
    };
    bool enqueue(Shape const& shape, void const* const* inputs, void* const* outputs, void* workspace, void* stream,
        std::string& error) const;

    BiBranchAttentionConfig const& config() const { return mConfig; }

private:
    BiBranchAttentionConfig mConfig;
    std::unique_ptr<KernelSet> mKernels;
};

} // namespace shrinkrt
