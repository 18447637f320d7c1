// What both plugins share: the namespace/version of docs/ops.md, INT32 field parsing and
// serialisation (ONNX INT attributes arrive as int32 fields), and error reporting.
#pragma once

#include "NvInferRuntime.h"
#include "shrinkrt_ops.gen.h"

#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace shrinkrt
{

constexpr char const* kNamespace = contract::kDomain;
constexpr char const* kVersion = contract::kVersion;

// One error line through the application's TensorRT logger (handed over by setLoggerFinder), or
// on stderr when the library was loaded without one (dlopen + static registration).
void reportError(char const* plugin, std::string const& what);

// The op's integer attributes, in docs/ops.md order; fields TensorRT passes that are not ours
// (plugin_namespace, plugin_version as CHAR) are ignored.
class IntFields
{
public:
    explicit IntFields(std::vector<std::string> names)
        : mNames(std::move(names))
    {
        for (auto const& n : mNames)
            mSpecs.emplace_back(n.c_str(), nullptr, nvinfer1::PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mSpecs.size());
        mCollection.fields = mSpecs.data();
    }

    // Fill values from a collection; false (with `error`) when a field is missing or not one INT32.
    bool parse(nvinfer1::PluginFieldCollection const* fc, std::string& error)
    {
        mValues.clear();
        for (int32_t i = 0; fc && i < fc->nbFields; ++i)
        {
            auto const& f = fc->fields[i];
            for (auto const& n : mNames)
            {
                if (n != f.name)
                    continue;
                if (f.type != nvinfer1::PluginFieldType::kINT32 || f.length != 1 || !f.data)
                {
                    error = "field '" + n + "' must be one INT32";
                    return false;
                }
                mValues[n] = *static_cast<int32_t const*>(f.data);
            }
        }
        for (auto const& n : mNames)
            if (!mValues.count(n))
            {
                error = "missing field '" + n + "'";
                return false;
            }
        return true;
    }

    int32_t operator[](std::string const& n) const { return mValues.at(n); }
    void set(std::string const& n, int32_t v) { mValues[n] = v; }

    // The field specs (for getFieldNames).
    nvinfer1::PluginFieldCollection const* specs() const { return &mCollection; }

    // The current values as a collection (for getFieldsToSerialize); valid until the next call.
    nvinfer1::PluginFieldCollection const* values()
    {
        mOut.clear();
        for (auto const& n : mNames)
            mOut.emplace_back(n.c_str(), &mValues.at(n), nvinfer1::PluginFieldType::kINT32, 1);
        mOutCollection.nbFields = static_cast<int32_t>(mOut.size());
        mOutCollection.fields = mOut.data();
        return &mOutCollection;
    }

private:
    std::vector<std::string> mNames;
    std::vector<nvinfer1::PluginField> mSpecs, mOut;
    nvinfer1::PluginFieldCollection mCollection{}, mOutCollection{};
    std::map<std::string, int32_t> mValues;
};

// What an IPluginV3 of ours holds beyond its op: the capability casts, name/version/namespace,
// fields (cloned, serialised) and no per-shape state.
template <class Derived>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }
    nvinfer1::IPluginV3* clone() noexcept override
    {
        auto* p = new Derived();
        p->mFields = mFields;
        return p;
    }
    char const* getPluginName() const noexcept override { return Derived::kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t, nvinfer1::PluginTensorDesc const*,
        int32_t) noexcept override
    {
        return 0; // everything shape-dependent is read from the descriptors at enqueue
    }
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override { return mFields.values(); }

protected:
    PluginBase() : mFields(Derived::fieldNames()) {}
    IntFields mFields;
};

// One creator per op: fields of docs/ops.md in, a plugin (or one error line) out.
template <class Plugin>
class Creator : public nvinfer1::IPluginCreatorV3One
{
public:
    nvinfer1::IPluginV3* createPlugin(
        char const*, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase) noexcept override
    {
        std::string error;
        Plugin* p = Plugin::create(fc, error);
        if (!p)
            reportError(Plugin::kName, error);
        return p;
    }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return mFields.specs(); }
    char const* getPluginName() const noexcept override { return Plugin::kName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    IntFields mFields{Plugin::fieldNames()};
};

inline bool isLinear(nvinfer1::DynamicPluginTensorDesc const& d, nvinfer1::DataType t)
{
    return d.desc.format == nvinfer1::TensorFormat::kLINEAR && d.desc.type == t;
}

inline int64_t volume(nvinfer1::Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
        v *= d.d[i];
    return v;
}

} // namespace shrinkrt
