// shrinkrt::QuantMatMul's kernels behind a plain launcher (the TensorRT samples' shape): the GEMV
// specialization for a call's rows (chunks of at most kQgemvMaxRows), the dequantize + cuBLASLt GEMM path
// for longer calls, the workspace and the argument marshalling, over device pointers and a CUstream. No
// TensorRT type appears here (see bibranch_attention_launch.h for why); quant_matmul_plugin.cpp adapts it.
#pragma once

#include "cublaslt_gemm.h"
#include "kernel_images.h"
#include "shrinkrt_ops.gen.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace shrinkrt
{

// The op's attributes (docs/ops.md) and the packed layout's widths they imply (docs/formats.md).
struct QuantMatMulConfig
{
    int32_t bits, groupSize, inFeatures, outFeatures;
    int32_t hasMins; // 1: the zero-point input holds fp16 mins (N, groups), w = q * s + m

    template <class Get>
    static QuantMatMulConfig from(Get get)
    {
        return {get("bits"), get("group_size"), get("in_features"), get("out_features"), get("has_mins")};
    }
    int64_t groups() const { return (inFeatures + groupSize - 1) / groupSize; }
    int64_t codeWords() const { return (inFeatures + contract::kWordBits - 1) / contract::kWordBits * bits; }
    int64_t zeroWords() const { return (groups() * bits + contract::kWordBits - 1) / contract::kWordBits; }
    // the zero-point input's second dimension: int32 words of the zero-point stream, or one fp16 min per group
    int64_t zeroCols() const { return hasMins ? groups() : zeroWords(); }
};

class QuantMatMulLauncher
{
public:
    explicit QuantMatMulLauncher(QuantMatMulConfig const& config) : mConfig(config) {}

    // "" when the kernels support this configuration and this library holds its specializations, else why not
    std::string check() const;
    // the GEMV specialization for a chunk of `rows` (<= kQgemvMaxRows) rows, and the prefill dequantize
    std::string gemvName(int64_t rows) const;
    std::string dequantName() const;
    std::vector<std::string> kernelNames() const;
    // the dense FP16 weight for prefill, when a call can have more rows than the GEMV takes
    size_t workspaceBytes(int64_t maxRows) const;

    // loads the kernels into the current CUDA context and cuBLASLt where it is (once)
    bool load(std::string& error);
    bool loaded() const { return mKernels != nullptr; }
    bool hasGemm() const { return mGemm != nullptr; }

    // Y (rows, N) = X (rows, K) @ W^T; inputs in docs/ops.md order, device pointers. Calls of more than
    // kQgemvMaxRows rows run dequantize + GEMM when cuBLASLt loaded and `workspace` is given, else the GEMV in
    // chunks.
    bool enqueue(int64_t rows, void const* const* inputs, void* output, void* workspace, void* stream,
        std::string& error) const;

    QuantMatMulConfig const& config() const { return mConfig; }

private:
    QuantMatMulConfig mConfig;
    std::unique_ptr<KernelSet> mKernels;
    std::unique_ptr<CublasLtGemm> mGemm;
};

} // namespace shrinkrt
