// Test support for tests/test_trt_plugins.py: loads libshrinkrt_trt_plugins.so with dlopen, creates a
// plugin through getCreators() with the given fields, and drives its build-phase interface the way
// TensorRT's builder would (constant-only dimension expressions stand in for TensorRT's), printing
// one JSON object. Compiled against the TensorRT headers only; needs no GPU and no TensorRT library.
//
//   plugin_probe LIB OP "k=v,k=v" "h:1x5x576;i:1536x72;..."   (h half, f float, b int8, i int32, l int64)
#include "NvInferRuntime.h"

#include <cstdio>
#include <dlfcn.h>
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
    if (argc != 5)
        return 2;
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
    // no GPU driver here: the per-context kernel load fails, and enqueue says so instead of crashing
    IPluginV3* attached = runtime->attachToContext(nullptr);
    auto* rt2 = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::vector<PluginTensorDesc> pin(nIn);
    for (int32_t i = 0; i < nIn; ++i)
        pin[i] = descs[i].desc;
    int32_t const rcEnqueue = rt2->enqueue(pin.data(), nullptr, nullptr, nullptr, nullptr, nullptr);
    std::printf("{\"created\": true, \"nb_outputs\": %d, \"rc_types\": %d, \"out_types\": \"%s\", \"rc_shapes\": %d, "
                "\"out_shapes\": %s, \"supported\": %s, \"fp32_supported\": %s, \"rc_configure\": %d, "
                "\"workspace\": %zu, \"serialized\": %s, \"rc_enqueue_without_gpu\": %d}\n",
        nOut, rcTypes, types.c_str(), rcShapes, shapes.c_str(), supported ? "true" : "false", fp32 ? "true" : "false",
        rcConfigure, ws, serial.c_str(), rcEnqueue);
    delete attached;
    delete plugin;
    return 0;
}
