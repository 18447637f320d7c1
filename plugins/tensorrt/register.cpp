// The library's entry points: `setLoggerFinder` + `getCreators` (IPluginRegistry::loadLibrary, trtexec
// --staticPlugins/--dynamicPlugins) and static registration at load time (Polygraphy's --plugins only
// dlopen()s the library).
#include "bibranch_attention_plugin.h"
#include "quant_matmul_plugin.h"

#include <dlfcn.h>
#include <iostream>
#include <mutex>

using namespace nvinfer1;

namespace
{
std::mutex gLoggerMutex;
ILoggerFinder* gLoggerFinder{nullptr};
} // namespace

void shrinkrt::reportError(char const* plugin, std::string const& what)
{
    std::string const line = std::string("[shrinkrt] ") + plugin + ": " + what;
    ILogger* logger = nullptr;
    {
        std::lock_guard<std::mutex> lock(gLoggerMutex);
        logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    }
    if (logger)
        logger->log(ILogger::Severity::kERROR, line.c_str());
    else
        std::cerr << line << std::endl;
}

namespace
{
shrinkrt::QuantMatMulCreator gQuantMatMul;
shrinkrt::BiBranchAttentionCreator gBiBranchAttention;
IPluginCreatorInterface* const gCreators[] = {&gQuantMatMul, &gBiBranchAttention};

// getPluginRegistry() of whichever TensorRT is already loaded (TensorRT or TensorRT-RTX). Resolved
// at run time instead of linked, so the same library loads into either, and into a process with
// neither (then nothing registers here and `getCreators` remains).
IPluginRegistry* loadedRegistry()
{
    using Fn = IPluginRegistry* (*) ();
    if (auto fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "getPluginRegistry")))
        return fn();
    for (char const* lib : {"libnvinfer.so.10", "libnvinfer.so", "libtensorrt_rtx.so.1", "libtensorrt_rtx.so"})
        if (void* h = dlopen(lib, RTLD_NOW | RTLD_NOLOAD))
            if (auto fn = reinterpret_cast<Fn>(dlsym(h, "getPluginRegistry")))
                return fn();
    return nullptr;
}

struct StaticRegistration
{
    IPluginRegistry* registry{nullptr};
    StaticRegistration()
    {
        registry = loadedRegistry();
        if (registry)
            for (auto* creator : gCreators)
                registry->registerCreator(*creator, shrinkrt::kNamespace);
    }
} gStaticRegistration;
} // namespace

extern "C" SHRINKRT_EXPORT void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

extern "C" SHRINKRT_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    // A loader that calls getCreators (IPluginRegistry::loadLibrary) registers them itself, and
    // refuses creators already registered: hand them over from the static registration.
    if (gStaticRegistration.registry)
    {
        for (auto* creator : gCreators)
            gStaticRegistration.registry->deregisterCreator(*creator);
        gStaticRegistration.registry = nullptr;
    }
    nbCreators = static_cast<int32_t>(sizeof(gCreators) / sizeof(gCreators[0]));
    return gCreators;
}
