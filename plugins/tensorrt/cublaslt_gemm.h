// Prefill GEMM for QuantMatMul: Y (M, N) = X (M, K) @ W^T with W the dense FP16 tile the dequant
// kernel wrote, on tensor cores through cuBLASLt. cuBLASLt is opened at run time (dlopen) and only
// compiled in when CMake finds cublasLt.h (SHRINKRT_WITH_CUBLASLT); without it the plugin runs the
// GEMV in chunks of 8 rows.
#pragma once

#include <cstdint>
#include <string>

namespace shrinkrt
{

class CublasLtGemm
{
public:
    static bool compiledIn();
    bool load(std::string& error); // once per execution context
    // fp16 row-major X (M, K), W (N, K) -> Y (M, N), fp32 accumulate
    bool run(uint64_t x, uint64_t w, uint64_t y, int64_t M, int64_t N, int64_t K, void* stream, std::string& error);
    ~CublasLtGemm();

private:
    void* mHandle{nullptr};
};

} // namespace shrinkrt
