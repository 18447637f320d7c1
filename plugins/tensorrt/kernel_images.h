// The kernels compiled ahead of time by plugins/kernels/aot.py (cubin for sm_75 + PTX), embedded in
// the generated shrinkrt_kernels.gen.cpp, and the driver-API loader the plugins launch them with.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace shrinkrt
{

struct KernelImage
{
    char const* name;  // specialization, e.g. "qgemv_b4_g128_m2_o1", "bibranch_split_b4_post_h9g3d64w64"
    char const* entry; // the function's symbol in the image
    unsigned char const* cubin;
    size_t cubin_size;
    char const* ptx;
    int num_warps;
    int shared_bytes;
    int num_params; // parameters the entry takes (Triton appends two scratch pointers)
};

extern KernelImage const kKernels[];
extern int const kNumKernels;

KernelImage const* findKernel(std::string const& name);

// The CUDA driver API resolved at run time (dlopen libcuda.so.1): the library loads, and its creators
// register, on machines without a GPU driver (TensorRT's builder on a CPU host, the registry check).
struct Driver
{
    using Res = int;
    Res (*cuCtxGetDevice)(int*) = nullptr;
    Res (*cuCtxGetCurrent)(void**) = nullptr;
    Res (*cuDeviceGetAttribute)(int*, int, int) = nullptr;
    Res (*cuModuleLoadData)(void**, void const*) = nullptr;
    Res (*cuModuleUnload)(void*) = nullptr;
    Res (*cuModuleGetFunction)(void**, void*, char const*) = nullptr;
    Res (*cuLaunchKernel)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
        void**) = nullptr;
    Res (*cuMemcpyDtoDAsync)(uint64_t, uint64_t, size_t, void*) = nullptr;
    Res (*cuGetErrorString)(Res, char const**) = nullptr;
    bool ok = false;
    std::string error;
    static Driver const& get();
};

// One loaded kernel: the image's cubin when the device runs sm_75 SASS, else its PTX (JIT by the driver).
// Modules are shared per (CUDA context, image) with a reference count: a model's many plugin instances
// (SmolLM2: 30 layers x 2 ops) load each distinct image once per context, not once per instance.
class LoadedKernel
{
public:
    bool load(KernelImage const& image, std::string& error);
    void unload();
    // args: pointers to each parameter value, without the two trailing scratch pointers (added here)
    bool launch(unsigned gx, unsigned gy, unsigned gz, std::vector<void*> args, void* stream, std::string& error) const;
    bool loaded() const { return mFunction != nullptr; }

private:
    KernelImage const* mImage{nullptr};
    void* mContext{nullptr};
    void* mModule{nullptr};
    void* mFunction{nullptr};
};

// Kernels of one plugin instance, loaded once per execution context (attachToContext).
class KernelSet
{
public:
    bool load(std::vector<std::string> const& names, std::string& error);
    LoadedKernel const& operator[](std::string const& name) const { return mKernels.at(name); }
    ~KernelSet();

private:
    std::unordered_map<std::string, LoadedKernel> mKernels;
};

} // namespace shrinkrt
