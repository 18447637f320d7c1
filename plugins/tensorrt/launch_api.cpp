// The launchers as plain C (libshrinkrt_launchers.so, built without TensorRT): what tests/test_launchers.py
// drives through ctypes over the CUDA driver stand-in (tests/fake_libcuda.c), so CI runs the plugins'
// launch glue (kernel choice, arguments, grids, workspace, the ring copy) on every commit. Attributes come
// as int32 arrays in docs/ops.md order (contract::<Op>::kAttributes); pointers are device addresses.
// Each call returns 0, or -1 with one line in `error`.
#include "bibranch_attention_launch.h"
#include "quant_matmul_launch.h"

#include <cstring>

#define SHRINKRT_C_API extern "C" __attribute__((visibility("default")))

namespace
{
int fail(std::string const& what, char* error, size_t errorBytes)
{
    if (error && errorBytes)
    {
        std::strncpy(error, what.c_str(), errorBytes - 1);
        error[errorBytes - 1] = '\0';
    }
    return -1;
}

// attribute name -> value, from an array in the contract's order
template <size_t N>
auto byName(char const* const (&names)[N], int32_t const* values)
{
    return [&names, values](char const* name) {
        for (size_t i = 0; i < N; ++i)
            if (std::strcmp(names[i], name) == 0)
                return values[i];
        return int32_t{-1};
    };
}

template <class Launcher>
Launcher* create(Launcher* launcher, char* error, size_t errorBytes)
{
    std::string const why = launcher->check();
    if (!why.empty())
    {
        fail(why, error, errorBytes);
        delete launcher;
        return nullptr;
    }
    return launcher;
}
} // namespace

using shrinkrt::BiBranchAttentionConfig;
using shrinkrt::BiBranchAttentionLauncher;
using shrinkrt::QuantMatMulConfig;
using shrinkrt::QuantMatMulLauncher;

SHRINKRT_C_API void* shrinkrt_bibranch_create(int32_t const* attributes, char* error, size_t errorBytes)
{
    auto const config = BiBranchAttentionConfig::from(byName(shrinkrt::contract::BiBranchAttention::kAttributes, attributes));
    return create(new BiBranchAttentionLauncher(config), error, errorBytes);
}

SHRINKRT_C_API size_t shrinkrt_bibranch_workspace(void* launcher, int64_t maxBatch)
{
    return static_cast<BiBranchAttentionLauncher*>(launcher)->workspaceBytes(maxBatch);
}

SHRINKRT_C_API int shrinkrt_bibranch_load(void* launcher, char* error, size_t errorBytes)
{
    std::string why;
    return static_cast<BiBranchAttentionLauncher*>(launcher)->load(why) ? 0 : fail(why, error, errorBytes);
}

SHRINKRT_C_API int shrinkrt_bibranch_enqueue(void* launcher, int32_t batch, int32_t tokens, int32_t capacity,
    void const* const* inputs, void* const* outputs, void* workspace, void* stream, char* error, size_t errorBytes)
{
    std::string why;
    return static_cast<BiBranchAttentionLauncher*>(launcher)->enqueue(
               {batch, tokens, capacity}, inputs, outputs, workspace, stream, why)
        ? 0
        : fail(why, error, errorBytes);
}

SHRINKRT_C_API void shrinkrt_bibranch_destroy(void* launcher)
{
    delete static_cast<BiBranchAttentionLauncher*>(launcher);
}

SHRINKRT_C_API void* shrinkrt_quant_matmul_create(int32_t const* attributes, char* error, size_t errorBytes)
{
    auto const config = QuantMatMulConfig::from(byName(shrinkrt::contract::QuantMatMul::kAttributes, attributes));
    return create(new QuantMatMulLauncher(config), error, errorBytes);
}

SHRINKRT_C_API size_t shrinkrt_quant_matmul_workspace(void* launcher, int64_t maxRows)
{
    return static_cast<QuantMatMulLauncher*>(launcher)->workspaceBytes(maxRows);
}

SHRINKRT_C_API int shrinkrt_quant_matmul_load(void* launcher, char* error, size_t errorBytes)
{
    std::string why;
    return static_cast<QuantMatMulLauncher*>(launcher)->load(why) ? 0 : fail(why, error, errorBytes);
}

SHRINKRT_C_API int shrinkrt_quant_matmul_enqueue(void* launcher, int64_t rows, void const* const* inputs, void* output,
    void* workspace, void* stream, char* error, size_t errorBytes)
{
    std::string why;
    return static_cast<QuantMatMulLauncher*>(launcher)->enqueue(rows, inputs, output, workspace, stream, why)
        ? 0
        : fail(why, error, errorBytes);
}

SHRINKRT_C_API void shrinkrt_quant_matmul_destroy(void* launcher)
{
    delete static_cast<QuantMatMulLauncher*>(launcher);
}
