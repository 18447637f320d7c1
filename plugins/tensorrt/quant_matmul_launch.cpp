#include "quant_matmul_launch.h"

#include <algorithm>

namespace shrinkrt
{
namespace
{
// positions of the op's inputs and the kernels' tiles: shrinkrt_ops.gen.h (op_contract.py)
using namespace contract::QuantMatMul;
using contract::kDequantBlockK;
using contract::kDequantBlockN;
constexpr int64_t kMaxRows = contract::kQgemvMaxRows; // the widest GEMV specialization

uint64_t dev(void const* p)
{
    return reinterpret_cast<uint64_t>(p);
}

template <size_t N>
bool oneOf(int32_t const (&values)[N], int64_t v)
{
    return std::find(values, values + N, v) != values + N;
}

template <size_t N>
std::string listed(int32_t const (&values)[N])
{
    std::string out;
    for (size_t i = 0; i < N; ++i)
        out += (i ? ", " : "") + std::to_string(values[i]);
    return out;
}
} // namespace

std::string QuantMatMulLauncher::check() const
{
    auto const& c = mConfig;
    if (!oneOf(contract::kWeightBits, c.bits))
        return "bits must be one of " + listed(contract::kWeightBits) + " (got " + std::to_string(c.bits) + ")";
    if (!oneOf(contract::kWeightGroupSizes, c.groupSize))
        return "group_size must be one of " + listed(contract::kWeightGroupSizes) + " (got "
            + std::to_string(c.groupSize) + ")";
    if (c.hasMins != 0 && c.hasMins != 1)
        return "has_mins must be 0 or 1 (got " + std::to_string(c.hasMins) + ")";
    if (c.hasMins
        && std::none_of(std::begin(contract::kWeightMinFormats), std::end(contract::kWeightMinFormats),
            [&](int32_t const (&f)[2]) { return f[0] == c.bits && f[1] == c.groupSize; }))
        return "fp16 mins are not a format of " + std::to_string(c.bits) + "-bit group-" + std::to_string(c.groupSize)
            + " weights (docs/formats.md)";
    if (c.inFeatures < 1 || c.outFeatures < 1)
        return "in_features and out_features must be positive";
    for (auto const& name : kernelNames())
        if (!findKernel(name))
            return "this library has no kernel " + name;
    return "";
}

std::string QuantMatMulLauncher::gemvName(int64_t rows) const
{
    int const pad = rows <= 2 ? 2 : (rows <= 4 ? 4 : 8);
    // Outliers are device data: the o1 kernel also serves layers without any (rowptr all zero).
    return "qgemv_b" + std::to_string(mConfig.bits) + "_g" + std::to_string(mConfig.groupSize)
        + (mConfig.hasMins ? "_min" : "") + "_m" + std::to_string(pad) + "_o1";
}

std::string QuantMatMulLauncher::dequantName() const
{
    return "dequant_b" + std::to_string(mConfig.bits) + "_g" + std::to_string(mConfig.groupSize)
        + (mConfig.hasMins ? "_min" : "");
}

std::vector<std::string> QuantMatMulLauncher::kernelNames() const
{
    return {gemvName(2), gemvName(4), gemvName(8), dequantName()};
}

size_t QuantMatMulLauncher::workspaceBytes(int64_t maxRows) const
{
    return maxRows > kMaxRows ? static_cast<size_t>(mConfig.outFeatures) * mConfig.inFeatures * 2 : 0;
}

bool QuantMatMulLauncher::load(std::string& error)
{
    if (mKernels)
        return true;
    auto kernels = std::make_unique<KernelSet>();
    if (!kernels->load(kernelNames(), error))
        return false;
    mKernels = std::move(kernels);
    mGemm = std::make_unique<CublasLtGemm>();
    std::string gemmError;
    if (!mGemm->load(gemmError))
        mGemm.reset(); // prefill runs the GEMV in chunks: correct, without tensor cores
    return true;
}

bool QuantMatMulLauncher::enqueue(
    int64_t rows, void const* const* inputs, void* output, void* workspace, void* stream, std::string& error) const
{
    if (!mKernels)
    {
        error = "kernels not loaded";
        return false;
    }
    int32_t K = mConfig.inFeatures, N = mConfig.outFeatures;
    int32_t G = static_cast<int32_t>(mConfig.groups()), words = static_cast<int32_t>(mConfig.codeWords()),
            zwords = static_cast<int32_t>(mConfig.zeroCols());
    int32_t strideX = K, strideY = N;
    uint64_t codes = dev(inputs[kCodes]), scales = dev(inputs[kScales]), zeros = dev(inputs[kZeros]);
    uint64_t rowptr = dev(inputs[kOutlierRowptr]), cols = dev(inputs[kOutlierCols]), vals = dev(inputs[kOutlierVals]);
    if (rows > kMaxRows && mGemm && workspace)
    {
        uint64_t w = dev(workspace);
        unsigned const gx = static_cast<unsigned>((N + kDequantBlockN - 1) / kDequantBlockN),
                       gy = static_cast<unsigned>((K + kDequantBlockK - 1) / kDequantBlockK);
        return (*mKernels)[dequantName()].launch(
                   gx, gy, 1, {&codes, &scales, &zeros, &rowptr, &cols, &vals, &w, &N, &K, &G, &words, &zwords}, stream, error)
            && mGemm->run(dev(inputs[kX]), w, dev(output), rows, N, K, stream, error);
    }
    unsigned const grid = static_cast<unsigned>((N + contract::kQgemvBlockN - 1) / contract::kQgemvBlockN);
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) // chunks of kMaxRows rows through the GEMV
    {
        int32_t M = static_cast<int32_t>(std::min(kMaxRows, rows - r0));
        uint64_t x = dev(inputs[kX]) + 2 * r0 * K, y = dev(output) + 2 * r0 * N;
        if (!(*mKernels)[gemvName(M)].launch(grid, 1, 1,
                {&x, &codes, &scales, &zeros, &rowptr, &cols, &vals, &y, &M, &N, &K, &G, &words, &zwords, &strideX,
                    &strideY},
                stream, error))
            return false;
    }
    return true;
}

} // namespace shrinkrt
