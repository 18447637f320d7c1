#include "cublaslt_gemm.h"

#ifdef SHRINKRT_WITH_CUBLASLT
#include <cublasLt.h>
#include <dlfcn.h>

namespace shrinkrt
{
namespace
{
struct Lt
{
    decltype(&cublasLtCreate) create = nullptr;
    decltype(&cublasLtDestroy) destroy = nullptr;
    decltype(&cublasLtMatmulDescCreate) descCreate = nullptr;
    decltype(&cublasLtMatmulDescDestroy) descDestroy = nullptr;
    decltype(&cublasLtMatmulDescSetAttribute) descSet = nullptr;
    decltype(&cublasLtMatrixLayoutCreate) layoutCreate = nullptr;
    decltype(&cublasLtMatrixLayoutDestroy) layoutDestroy = nullptr;
    decltype(&cublasLtMatmul) matmul = nullptr;
    bool ok = false;

    static Lt const& get()
    {
        static Lt const lt = [] {
            Lt l;
            void* h = nullptr;
            for (char const* name : {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"})
                if ((h = dlopen(name, RTLD_NOW | RTLD_LOCAL)))
                    break;
            if (!h)
                return l;
            l.create = reinterpret_cast<decltype(l.create)>(dlsym(h, "cublasLtCreate"));
            l.destroy = reinterpret_cast<decltype(l.destroy)>(dlsym(h, "cublasLtDestroy"));
            l.descCreate = reinterpret_cast<decltype(l.descCreate)>(dlsym(h, "cublasLtMatmulDescCreate"));
            l.descDestroy = reinterpret_cast<decltype(l.descDestroy)>(dlsym(h, "cublasLtMatmulDescDestroy"));
            l.descSet = reinterpret_cast<decltype(l.descSet)>(dlsym(h, "cublasLtMatmulDescSetAttribute"));
            l.layoutCreate = reinterpret_cast<decltype(l.layoutCreate)>(dlsym(h, "cublasLtMatrixLayoutCreate"));
            l.layoutDestroy = reinterpret_cast<decltype(l.layoutDestroy)>(dlsym(h, "cublasLtMatrixLayoutDestroy"));
            l.matmul = reinterpret_cast<decltype(l.matmul)>(dlsym(h, "cublasLtMatmul"));
            l.ok = l.create && l.destroy && l.descCreate && l.descDestroy && l.descSet && l.layoutCreate
                && l.layoutDestroy && l.matmul;
            return l;
        }();
        return lt;
    }
};
} // namespace

bool CublasLtGemm::compiledIn()
{
    return true;
}

bool CublasLtGemm::load(std::string& error)
{
    Lt const& lt = Lt::get();
    if (!lt.ok)
    {
        error = "libcublasLt (CUDA 12 or 13) not found: prefill falls back to the GEMV";
        return false;
    }
    cublasLtHandle_t h = nullptr;
    if (lt.create(&h) != CUBLAS_STATUS_SUCCESS)
    {
        error = "cublasLtCreate failed";
        return false;
    }
    mHandle = h;
    return true;
}

bool CublasLtGemm::run(uint64_t x, uint64_t w, uint64_t y, int64_t M, int64_t N, int64_t K, void* stream,
    std::string& error)
{
    Lt const& lt = Lt::get();
    // Column-major view of the row-major tensors: Y^T (N, M) = W (N, K) . X^T (K, M), where W is the
    // column-major (K, N) buffer transposed, and X^T / Y^T are X / Y as stored.
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasOperation_t const transA = CUBLAS_OP_T, transB = CUBLAS_OP_N;
    bool ok = lt.descCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS
        && lt.descSet(desc, CUBLASLT_MATMUL_DESC_TRANSA, &transA, sizeof(transA)) == CUBLAS_STATUS_SUCCESS
        && lt.descSet(desc, CUBLASLT_MATMUL_DESC_TRANSB, &transB, sizeof(transB)) == CUBLAS_STATUS_SUCCESS
        && lt.layoutCreate(&a, CUDA_R_16F, K, N, K) == CUBLAS_STATUS_SUCCESS
        && lt.layoutCreate(&b, CUDA_R_16F, K, M, K) == CUBLAS_STATUS_SUCCESS
        && lt.layoutCreate(&c, CUDA_R_16F, N, M, N) == CUBLAS_STATUS_SUCCESS;
    float const alpha = 1.f, beta = 0.f;
    // algo nullptr: cuBLASLt runs its own heuristic query
    ok = ok
        && lt.matmul(static_cast<cublasLtHandle_t>(mHandle), desc, &alpha, reinterpret_cast<void const*>(w), a,
               reinterpret_cast<void const*>(x), b, &beta, reinterpret_cast<void*>(y), c, reinterpret_cast<void*>(y), c,
               nullptr, nullptr, 0, static_cast<cudaStream_t>(stream))
            == CUBLAS_STATUS_SUCCESS;
    for (auto* l : {a, b, c})
        if (l)
            lt.layoutDestroy(l);
    if (desc)
        lt.descDestroy(desc);
    if (!ok)
        error = "cublasLtMatmul failed";
    return ok;
}

CublasLtGemm::~CublasLtGemm()
{
    if (mHandle && Lt::get().ok)
        Lt::get().destroy(static_cast<cublasLtHandle_t>(mHandle));
}

} // namespace shrinkrt

#else

namespace shrinkrt
{
bool CublasLtGemm::compiledIn()
{
    return false;
}
bool CublasLtGemm::load(std::string& error)
{
    error = "built without cuBLASLt (cublasLt.h not found at configure time)";
    return false;
}
bool CublasLtGemm::run(uint64_t, uint64_t, uint64_t, int64_t, int64_t, int64_t, void*, std::string& error)
{
    error = "built without cuBLASLt";
    return false;
}
CublasLtGemm::~CublasLtGemm() = default;
} // namespace shrinkrt

#endif
