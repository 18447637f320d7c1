#include "kernel_images.h"

#include <cstring>
#include <dlfcn.h>
#include <map>
#include <mutex>
#include <utility>

namespace shrinkrt
{
namespace
{
constexpr int kAttrCcMajor = 75; // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrCcMinor = 76; // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR

template <typename F>
bool bind(void* lib, char const* name, F& fn)
{
    fn = reinterpret_cast<F>(dlsym(lib, name));
    return fn != nullptr;
}

std::string describe(int res)
{
    char const* s = nullptr;
    Driver const& d = Driver::get();
    if (d.cuGetErrorString && d.cuGetErrorString(res, &s) == 0 && s)
        return s;
    return "CUDA driver error " + std::to_string(res);
}

struct SharedModule
{
    void* module;
    void* function;
    int refs;
};

// the loaded modules of the process, by (context, image)
std::mutex gModulesLock;
std::map<std::pair<void*, KernelImage const*>, SharedModule>& modules()
{
    static std::map<std::pair<void*, KernelImage const*>, SharedModule> m;
    return m;
}
} // namespace

KernelImage const* findKernel(std::string const& name)
{
    for (int i = 0; i < kNumKernels; ++i)
        if (name == kKernels[i].name)
            return &kKernels[i];
    return nullptr;
}

Driver const& Driver::get()
{
    static Driver const d = [] {
        Driver d;
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!lib)
        {
            d.error = "libcuda.so.1 not found (no NVIDIA driver on this machine)";
            return d;
        }
        d.ok = bind(lib, "cuCtxGetDevice", d.cuCtxGetDevice) && bind(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent)
            && bind(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute)
            && bind(lib, "cuModuleLoadData", d.cuModuleLoadData) && bind(lib, "cuModuleUnload", d.cuModuleUnload)
            && bind(lib, "cuModuleGetFunction", d.cuModuleGetFunction) && bind(lib, "cuLaunchKernel", d.cuLaunchKernel)
            && bind(lib, "cuMemcpyDtoDAsync_v2", d.cuMemcpyDtoDAsync)
            && bind(lib, "cuGetErrorString", d.cuGetErrorString);
        if (!d.ok)
            d.error = "libcuda.so.1 lacks a driver API entry point the plugins need";
        return d;
    }();
    return d;
}

bool LoadedKernel::load(KernelImage const& image, std::string& error)
{
    Driver const& d = Driver::get();
    if (!d.ok)
    {
        error = d.error;
        return false;
    }
    int dev = 0, major = 0, minor = 0;
    void* ctx = nullptr;
    int res = d.cuCtxGetCurrent(&ctx);
    if (res == 0 && !ctx)
        res = 201; // CUDA_ERROR_INVALID_CONTEXT: none is current
    if (res == 0)
        res = d.cuCtxGetDevice(&dev);
    if (res == 0)
        res = d.cuDeviceGetAttribute(&major, kAttrCcMajor, dev);
    if (res == 0)
        res = d.cuDeviceGetAttribute(&minor, kAttrCcMinor, dev);
    if (res != 0)
    {
        error = "no current CUDA context: " + describe(res);
        return false;
    }
    unload();
    std::lock_guard<std::mutex> lock(gModulesLock);
    auto it = modules().find({ctx, &image});
    if (it == modules().end())
    {
        // sm_75 SASS runs on compute capability 7.5 only; every newer GPU JIT-compiles the compute_75 PTX.
        bool const sass = major == 7 && minor == 5;
        void *module = nullptr, *function = nullptr;
        res = d.cuModuleLoadData(&module, sass ? static_cast<void const*>(image.cubin) : image.ptx);
        if (res == 0)
            res = d.cuModuleGetFunction(&function, module, image.entry);
        if (res != 0)
        {
            error = std::string("loading kernel ") + image.name + " (" + (sass ? "cubin" : "PTX") + "): " + describe(res);
            if (module)
                d.cuModuleUnload(module);
            return false;
        }
        it = modules().emplace(std::make_pair(ctx, &image), SharedModule{module, function, 0}).first;
    }
    ++it->second.refs;
    mImage = &image;
    mContext = ctx;
    mModule = it->second.module;
    mFunction = it->second.function;
    return true;
}

void LoadedKernel::unload()
{
    if (mImage && Driver::get().ok)
    {
        std::lock_guard<std::mutex> lock(gModulesLock);
        auto it = modules().find({mContext, mImage});
        if (it != modules().end() && --it->second.refs == 0)
        {
            Driver::get().cuModuleUnload(it->second.module);
            modules().erase(it);
        }
    }
    mImage = nullptr;
    mContext = nullptr;
    mModule = nullptr;
    mFunction = nullptr;
}

bool LoadedKernel::launch(
    unsigned gx, unsigned gy, unsigned gz, std::vector<void*> args, void* stream, std::string& error) const
{
    if (!mFunction)
    {
        error = "kernel not loaded";
        return false;
    }
    static uint64_t scratch = 0; // global/profile scratch: the kernels request none (size 0 in kernels.json)
    args.push_back(&scratch);
    args.push_back(&scratch);
    if (static_cast<int>(args.size()) != mImage->num_params)
    {
        error = std::string(mImage->name) + " takes " + std::to_string(mImage->num_params) + " parameters, got "
            + std::to_string(args.size());
        return false;
    }
    int const res = Driver::get().cuLaunchKernel(mFunction, gx, gy, gz, 32u * mImage->num_warps, 1, 1,
        mImage->shared_bytes, stream, args.data(), nullptr);
    if (res != 0)
    {
        error = std::string("launching ") + mImage->name + ": " + describe(res);
        return false;
    }
    return true;
}

bool KernelSet::load(std::vector<std::string> const& names, std::string& error)
{
    for (auto const& name : names)
    {
        KernelImage const* image = findKernel(name);
        if (!image)
        {
            error = "no kernel '" + name + "' in this library (specializations come from plugins/kernels/aot.py)";
            return false;
        }
        if (!mKernels[name].load(*image, error))
            return false;
    }
    return true;
}

KernelSet::~KernelSet()
{
    for (auto& kv : mKernels)
        kv.second.unload();
}

} // namespace shrinkrt

// The specializations this library holds, as plain C (callable through ctypes with neither TensorRT nor
// a GPU): `shrinkrt build --plugins` checks an export's needs against them before building an engine.
extern "C" __attribute__((visibility("default"))) int shrinkrt_num_kernels()
{
    return shrinkrt::kNumKernels;
}

extern "C" __attribute__((visibility("default"))) char const* shrinkrt_kernel_name(int i)
{
    return i >= 0 && i < shrinkrt::kNumKernels ? shrinkrt::kKernels[i].name : nullptr;
}
