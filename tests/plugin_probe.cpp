// Test support for tests/test_trt_plugins.py: loads libshrinkrt_trt_plugins.so with dlopen, creates a
// plugin through getCreators() with the given fields, and drives its build-phase interface the way
// TensorRT's builder would (constant-only dimension expressions stand in for TensorRT's), printing
// one JSON object. Compiled against the TensorRT headers only; needs no GPU and no TensorRT library.
//
//   plugin_probe LIB OP "k=v,k=v" "h:1x5x576;i:1536x72;..."   (h half, f float, b int8, i int32, l int64)
//   plugin_probe ... DIR    additionally, on a GPU: inputs from DIR/in<i>.bin, one enqueue on the
//                           device (no TensorRT involved), outputs to DIR/out<o>.bin
#include "NvInferRuntime.h"

#include <cstdio>
#include <dlfcn.h>
#include <algorithm>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
struct ConstImpl : apiv::VDimensionExpr
{
    int64_t v;
    explicit ConstImpl(int64_t x) : v(x) {}
    bool isConstant() const override { return true; }
    int64_t getConstantValue() const override { return v; }
    bool isSizeTensor() const override { return false; }
};

struct ConstExpr : IDimensionExpr
{
    ConstImpl impl;
    explicit ConstExpr(int64_t v) : impl(v) { mImpl = &impl; }
};

struct BuilderImpl : apiv::VExprBuilder
{
    std::vector<std::unique_ptr<ConstExpr>> made;
    IDimensionExpr const* constant(int64_t v) override
    {
        made.push_back(std::make_unique<ConstExpr>(v));
        return made.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr; // the plugins need no arithmetic on dimensions
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }
};

struct Builder : IExprBuilder
{
    BuilderImpl impl;
    Builder() { mImpl = &impl; }
};

DataType parseType(char c)
{
    switch (c)
    {
    case 'h': return DataType::kHALF;
    case 'f': return DataType::kFLOAT;
    case 'b': return DataType::kINT8;
    case 'i': return DataType::kINT32;
    default: return DataType::kINT64;
    }
}

size_t elemSize(DataType t)
{
    switch (t)
    {
    case DataType::kHALF: return 2;
    case DataType::kINT8: return 1;
    case DataType::kINT64: return 8;
    default: return 4;
    }
}

// The driver API, for the GPU run (the plugin resolves its own copy).
struct Cuda
{
    int (*init)(unsigned) = nullptr;
    int (*deviceGet)(int*, int) = nullptr;
    int (*retain)(void**, int) = nullptr;
    int (*setCurrent)(void*) = nullptr;
    int (*alloc)(uint64_t*, size_t) = nullptr;
    int (*htod)(uint64_t, void const*, size_t) = nullptr;
    int (*dtoh)(void*, uint64_t, size_t) = nullptr;
    int (*sync)() = nullptr;
    bool load()
    {
        void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (!h)
            return false;
        init = reinterpret_cast<decltype(init)>(dlsym(h, "cuInit"));
        deviceGet = reinterpret_cast<decltype(deviceGet)>(dlsym(h, "cuDeviceGet"));
        retain = reinterpret_cast<decltype(retain)>(dlsym(h, "cuDevicePrimaryCtxRetain"));
        setCurrent = reinterpret_cast<decltype(setCurrent)>(dlsym(h, "cuCtxSetCurrent"));
        alloc = reinterpret_cast<decltype(alloc)>(dlsym(h, "cuMemAlloc_v2"));
        htod = reinterpret_cast<decltype(htod)>(dlsym(h, "cuMemcpyHtoD_v2"));
        dtoh = reinterpret_cast<decltype(dtoh)>(dlsym(h, "cuMemcpyDtoH_v2"));
        sync = reinterpret_cast<decltype(sync)>(dlsym(h, "cuCtxSynchronize"));
        int dev = 0;
        void* ctx = nullptr;
        return init && init(0) == 0 && deviceGet(&dev, 0) == 0 && retain(&ctx, dev) == 0 && setCurrent(ctx) == 0;
    }
};

char typeName(DataType t)
{
    switch (t)
    {
    case DataType::kHALF: return 'h';
    case DataType::kFLOAT: return 'f';
    case DataType::kINT8: return 'b';
    case DataType::kINT32: return 'i';
    case DataType::kINT64: return 'l';
    default: return '?';
    }
}

int64_t volumeOf(Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
        v *= d.d[i];
    return v;
}

std::vector<std::string> split(std::string const& s, char sep)
{
    std::vector<std::string> out;
    std::stringstream ss(s);
    for (std::string item; std::getline(ss, item, sep);)
        if (!item.empty())
            out.push_back(item);
    return out;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 5 && argc != 6)
        return 2;
    Cuda cuda;
    if (argc == 6 && !cuda.load())
    {
        std::printf("{\"error\": \"no CUDA device\"}\n");
        return 1;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib)
    {
        std::printf("{\"error\": \"dlopen failed\"}\n");
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    IPluginCreatorV3One* creator = nullptr;
    for (int32_t i = 0; i < n; ++i)
    {
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::string(c->getPluginName()) == argv[2])
            creator = c;
    }
    // fields
    std::vector<std::string> names;
    std::vector<int32_t> values;
    for (auto const& kv : split(argv[3], ','))
    {
        names.push_back(kv.substr(0, kv.find('=')));
        values.push_back(std::stoi(kv.substr(kv.find('=') + 1)));
    }
    std::vector<PluginField> fields;
    for (size_t i = 0; i < names.size(); ++i)
        fields.emplace_back(names[i].c_str(), &values[i], PluginFieldType::kINT32, 1);
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator ? creator->createPlugin("probe", &fc, TensorRTPhase::kBUILD) : nullptr;
    if (!plugin)
    {
        std::printf("{\"created\": false}\n");
        return 0;
    }
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    // inputs
    Builder eb;
    std::vector<DataType> inTypes;
    std::vector<DimsExprs> inDims;
    std::vector<DynamicPluginTensorDesc> descs;
    for (auto const& spec : split(argv[4], ';'))
    {
        inTypes.push_back(parseType(spec[0]));
        DimsExprs d{};
        Dims dd{};
        for (auto const& x : split(spec.substr(2), 'x'))
        {
            dd.d[dd.nbDims] = std::stoll(x);
            d.d[d.nbDims++] = eb.constant(dd.d[dd.nbDims++]);
        }
        inDims.push_back(d);
        DynamicPluginTensorDesc desc{};
        desc.desc.dims = dd;
        desc.desc.type = inTypes.back();
        desc.desc.format = TensorFormat::kLINEAR;
        desc.min = desc.max = desc.opt = dd;
        descs.push_back(desc);
    }
    int32_t const nIn = static_cast<int32_t>(inTypes.size());
    int32_t const nOut = build->getNbOutputs();
    std::vector<DataType> outTypes(nOut);
    int32_t const rcTypes = build->getOutputDataTypes(outTypes.data(), nOut, inTypes.data(), nIn);
    std::vector<DimsExprs> outDims(nOut);
    int32_t const rcShapes = build->getOutputShapes(inDims.data(), nIn, nullptr, 0, outDims.data(), nOut, eb);
    std::string shapes = "[";
    for (int32_t o = 0; o < nOut && rcShapes == 0; ++o)
    {
        shapes += (o ? ",[" : "[");
        for (int32_t j = 0; j < outDims[o].nbDims; ++j)
            shapes += (j ? "," : "") + std::to_string(outDims[o].d[j]->getConstantValue());
        shapes += "]";
        DynamicPluginTensorDesc desc{};
        desc.desc.type = outTypes[o];
        desc.desc.format = TensorFormat::kLINEAR;
        for (int32_t j = 0; j < outDims[o].nbDims; ++j)
            desc.desc.dims.d[j] = outDims[o].d[j]->getConstantValue();
        desc.desc.dims.nbDims = outDims[o].nbDims;
        desc.min = desc.max = desc.opt = desc.desc.dims;
        descs.push_back(desc);
    }
    shapes += "]";
    std::string types;
    for (auto t : outTypes)
        types += typeName(t);
    bool supported = true;
    for (int32_t pos = 0; pos < nIn + nOut; ++pos)
        supported = supported && build->supportsFormatCombination(pos, descs.data(), nIn, nOut);
    descs[0].desc.type = DataType::kFLOAT; // activations in FP32: the plugins take FP16 only
    bool const fp32 = build->supportsFormatCombination(0, descs.data(), nIn, nOut);
    descs[0].desc.type = inTypes[0];
    int32_t const rcConfigure = build->configurePlugin(descs.data(), nIn, descs.data() + nIn, nOut);
    size_t const ws = build->getWorkspaceSize(descs.data(), nIn, descs.data() + nIn, nOut);
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    std::string serial = "{";
    for (int32_t i = 0; i < ser->nbFields; ++i)
        serial += std::string(i ? "," : "") + "\"" + ser->fields[i].name
            + "\":" + std::to_string(*static_cast<int32_t const*>(ser->fields[i].data));
    serial += "}";
    // without a GPU driver the per-context kernel load fails: no plugin for the context (TensorRT then fails
    // the context's creation), and an instance run without attaching loads at enqueue and fails cleanly
    IPluginV3* attached = runtime->attachToContext(nullptr);
    bool attachedOk = attached != nullptr;
    IPluginV3OneRuntime* rt2 = attachedOk
        ? static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME))
        : runtime;
    std::vector<PluginTensorDesc> pin(nIn);
    for (int32_t i = 0; i < nIn; ++i)
        pin[i] = descs[i].desc;
    int32_t rcEnqueue = -1;
    if (argc == 6) // on the GPU: real buffers, one enqueue on the default stream
    {
        std::string const dir = argv[5];
        std::vector<uint64_t> bufs(nIn + nOut);
        std::vector<PluginTensorDesc> pout(nOut);
        for (int32_t i = 0; i < nIn + nOut; ++i)
        {
            size_t const bytes = static_cast<size_t>(std::max<int64_t>(1, volumeOf(descs[i].desc.dims)))
                * elemSize(descs[i].desc.type);
            cuda.alloc(&bufs[i], bytes);
            if (i < nIn)
            {
                std::ifstream f(dir + "/in" + std::to_string(i) + ".bin", std::ios::binary);
                std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
                if (data.size() != bytes)
                {
                    std::printf("{\"error\": \"in%d.bin holds %zu bytes, expected %zu\"}\n", i, data.size(), bytes);
                    return 1;
                }
                cuda.htod(bufs[i], data.data(), bytes);
            }
            else
                pout[i - nIn] = descs[i].desc;
        }
        uint64_t wsBuf = 0;
        if (ws)
            cuda.alloc(&wsBuf, ws);
        std::vector<void const*> ins(nIn);
        std::vector<void*> outs(nOut);
        for (int32_t i = 0; i < nIn; ++i)
            ins[i] = reinterpret_cast<void const*>(bufs[i]);
        for (int32_t o = 0; o < nOut; ++o)
            outs[o] = reinterpret_cast<void*>(bufs[nIn + o]);
        // attach again now that a context is current: the kernels load
        delete attached;
        attached = runtime->attachToContext(nullptr);
        attachedOk = attached != nullptr; // no plugin: TensorRT would fail the context (rc_enqueue -2: not run)
        // a second instance attached to the same context (another layer's) shares the loaded modules
        IPluginV3* second = attachedOk ? runtime->attachToContext(nullptr) : nullptr;
        if (attachedOk)
        {
            rt2 = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
            rcEnqueue = rt2->enqueue(pin.data(), pout.data(), ins.data(), outs.data(), reinterpret_cast<void*>(wsBuf), nullptr);
        }
        else
            rcEnqueue = -2;
        delete second;
        int const rcSync = cuda.sync();
        for (int32_t o = 0; o < nOut && rcEnqueue == 0 && rcSync == 0; ++o)
        {
            size_t const bytes = static_cast<size_t>(volumeOf(pout[o].dims)) * elemSize(pout[o].type);
            std::vector<char> data(bytes);
            cuda.dtoh(data.data(), bufs[nIn + o], bytes);
            std::ofstream(dir + "/out" + std::to_string(o) + ".bin", std::ios::binary).write(data.data(), bytes);
        }
        if (rcSync != 0)
            rcEnqueue = 1000 + rcSync;
    }
    else
        rcEnqueue = rt2->enqueue(pin.data(), nullptr, nullptr, nullptr, nullptr, nullptr);
    std::printf("{\"created\": true, \"nb_outputs\": %d, \"rc_types\": %d, \"out_types\": \"%s\", \"rc_shapes\": %d, "
                "\"out_shapes\": %s, \"supported\": %s, \"fp32_supported\": %s, \"rc_configure\": %d, "
                "\"workspace\": %zu, \"serialized\": %s, \"attached\": %s, \"rc_enqueue\": %d}\n",
        nOut, rcTypes, types.c_str(), rcShapes, shapes.c_str(), supported ? "true" : "false", fp32 ? "true" : "false",
        rcConfigure, ws, serial.c_str(), attachedOk ? "true" : "false", rcEnqueue);
    delete attached;
    delete plugin;
    return 0;
}
