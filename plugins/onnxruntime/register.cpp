// libshrinkrt_ort_ops: the shrinkrt ops as an ONNX Runtime custom-op library (CPU execution provider).
// Registered with SessionOptions.register_custom_ops_library(path); ONNX Runtime then runs these
// kernels for the model's shrinkrt nodes instead of inlining their reference bodies.
//
// One CustomOp per type combination a model can carry (activations float32/float16 x feature store
// fp16 (bits 16) / int8 (bits 8, 4)): ONNX Runtime picks the kernel by the node's input types.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "bibranch_attention.h"
#include "shrinkrt_ops.gen.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace
{
using namespace shrinkrt;
using namespace shrinkrt::contract::BiBranchAttention;
constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr auto kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr auto kI64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

[[noreturn]] void fail(std::string const& what)
{
    ORT_CXX_API_THROW(std::string("shrinkrt::BiBranchAttention: ") + what, ORT_INVALID_ARGUMENT);
}

// A float input as fp32: the tensor itself, or a converted copy when the model's activations are fp16.
struct Floats
{
    float const* data = nullptr;
    std::vector<float> copy;
    std::vector<int64_t> shape;
};

Floats floats(Ort::KernelContext& ctx, size_t index)
{
    Floats f;
    Ort::ConstValue v = ctx.GetInput(index);
    auto info = v.GetTensorTypeAndShapeInfo();
    f.shape = info.GetShape();
    if (info.GetElementType() == kF32)
    {
        f.data = v.GetTensorData<float>();
        return f;
    }
    size_t const n = info.GetElementCount();
    auto const* h = v.GetTensorData<uint16_t>();
    f.copy.resize(n);
    for (size_t i = 0; i < n; ++i)
        f.copy[i] = cpu::halfToFloat(h[i]);
    f.data = f.copy.data();
    return f;
}

std::vector<int64_t> shapeOf(Ort::KernelContext& ctx, size_t index)
{
    return ctx.GetInput(index).GetTensorTypeAndShapeInfo().GetShape();
}

struct BiBranchKernel
{
    explicit BiBranchKernel(OrtKernelInfo const* info)
    {
        Ort::ConstKernelInfo ki(info);
        int32_t* fields[] = {&mShape.heads, &mShape.kvHeads, &mShape.headDim, &mShape.window, &mShape.rankK,
            &mShape.rankV, &mShape.bits, &mShape.keyMode};
        for (int i = 0; i < kNbAttributes; ++i)
            *fields[i] = static_cast<int32_t>(ki.GetAttribute<int64_t>(kAttributes[i]));
        char const* bad = cpu::checkBiBranch(mShape);
        if (*bad)
            fail(bad);
    }

    void Compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        cpu::BiBranchShape s = mShape;
        int64_t const H = s.heads, G = s.kvHeads, D = s.headDim, W = s.window;
        bool const quant = s.bits < 16;
        size_t const want = kNbInputs - (quant ? 0 : contract::kUnscaledDrop);
        if (ctx.GetInputCount() != want)
            fail("expects " + std::to_string(want) + " inputs at bits " + std::to_string(s.bits) + ", got "
                + std::to_string(ctx.GetInputCount()));
        Floats q = floats(ctx, kQ), k = floats(ctx, kK), v = floats(ctx, kV), cK = floats(ctx, kCK),
               cV = floats(ctx, kCV), kUp = floats(ctx, kKUp), vUp = floats(ctx, kVUp), kB = floats(ctx, kKBias),
               vB = floats(ctx, kVBias), cosT = floats(ctx, kRopeCos), sinT = floats(ctx, kRopeSin);
        if (q.shape.size() != 3 || q.shape[2] != H * D)
            fail("q must be (B, T, num_heads*head_dim)");
        s.batch = q.shape[0];
        s.tokens = q.shape[1];
        auto const win = shapeOf(ctx, kWinK), feat = shapeOf(ctx, kFeatK);
        if (win != std::vector<int64_t>{s.batch, G, W, D})
            fail("win_k must be (B, num_kv_heads, window, head_dim)");
        if (feat.size() != 3 || feat[0] != s.batch)
            fail("feat_k must be (B, S, C)");
        s.capacity = feat[1];
        int64_t const ck = s.bits == 4 ? (s.rankK + 1) / 2 : s.rankK, cv = s.bits == 4 ? (s.rankV + 1) / 2 : s.rankV;
        if (feat[2] != ck || shapeOf(ctx, kFeatV) != std::vector<int64_t>{s.batch, s.capacity, cv})
            fail("feature stores must be (B, S, C) with C = " + std::to_string(ck) + " / " + std::to_string(cv));
        if (cK.shape != std::vector<int64_t>{s.batch, s.tokens, s.rankK} || cV.shape != std::vector<int64_t>{s.batch, s.tokens, s.rankV})
            fail("c_k / c_v must be (B, T, rank)");
        if (cosT.shape.size() != 2 || cosT.shape[1] != D || cosT.shape[0] < s.capacity)
            fail("rope tables must be (>= S, head_dim)");
        int64_t const past = ctx.GetInput(kPastLength).GetTensorData<int64_t>()[0];
        if (past < 0 || past + s.tokens > s.capacity)
            fail("past_length " + std::to_string(past) + " + " + std::to_string(s.tokens) + " tokens exceeds the store's "
                + std::to_string(s.capacity) + " rows");

        cpu::BiBranchIO io{};
        io.q = q.data, io.k = k.data, io.v = v.data, io.cK = cK.data, io.cV = cV.data, io.kUp = kUp.data,
        io.vUp = vUp.data, io.kBias = kB.data, io.vBias = vB.data, io.ropeCos = cosT.data, io.ropeSin = sinT.data;
        io.winK = ctx.GetInput(kWinK).GetTensorData<uint16_t>();
        io.winV = ctx.GetInput(kWinV).GetTensorData<uint16_t>();
        io.featK = ctx.GetInput(kFeatK).GetTensorRawData();
        io.featV = ctx.GetInput(kFeatV).GetTensorRawData();
        io.past = past;
        int64_t const gk = (s.rankK + contract::kFeatureGroup - 1) / contract::kFeatureGroup;
        int64_t const gv = (s.rankV + contract::kFeatureGroup - 1) / contract::kFeatureGroup;
        if (quant)
        {
            io.featKScales = ctx.GetInput(kFeatKScales).GetTensorData<uint16_t>();
            io.featVScales = ctx.GetInput(kFeatVScales).GetTensorData<uint16_t>();
        }
        bool const halfOut = ctx.GetInput(kQ).GetTensorTypeAndShapeInfo().GetElementType() == kF16;
        std::vector<float> y32(halfOut ? static_cast<size_t>(s.batch * s.tokens * H * D) : 0);
        Ort::UnownedValue y = ctx.GetOutput(kY, {s.batch, s.tokens, H * D});
        io.y = halfOut ? y32.data() : y.GetTensorMutableData<float>();
        io.winKOut = ctx.GetOutput(kWinKOut, win).GetTensorMutableData<uint16_t>();
        io.winVOut = ctx.GetOutput(kWinVOut, win).GetTensorMutableData<uint16_t>();
        io.featKNew = ctx.GetOutput(kFeatKNew, {s.batch, s.tokens, ck}).GetTensorMutableRawData();
        io.featVNew = ctx.GetOutput(kFeatVNew, {s.batch, s.tokens, cv}).GetTensorMutableRawData();
        if (quant)
        {
            io.featKScalesNew = ctx.GetOutput(kFeatKScalesNew, {s.batch, s.tokens, gk}).GetTensorMutableData<uint16_t>();
            io.featVScalesNew = ctx.GetOutput(kFeatVScalesNew, {s.batch, s.tokens, gv}).GetTensorMutableData<uint16_t>();
        }
        // ONNX Runtime's intra-op pool (the session's intra_op_num_threads)
        cpu::ParallelFor parallel = [&ctx](size_t n, std::function<void(size_t)> const& fn) {
            if (n == 1)
                return fn(0);
            auto tramp = [](void* user, size_t i) { (*static_cast<std::function<void(size_t)> const*>(user))(i); };
            ctx.ParallelFor(tramp, n, 0, const_cast<std::function<void(size_t)>*>(&fn));
        };
        cpu::biBranchAttention(s, io, parallel);
        if (halfOut)
        {
            auto* out = y.GetTensorMutableData<uint16_t>();
            for (size_t i = 0; i < y32.size(); ++i)
                out[i] = cpu::floatToHalf(y32[i]);
        }
    }

    cpu::BiBranchShape mShape{};
};

// One registration per (activation dtype, feature dtype).
struct BiBranchOp : Ort::CustomOpBase<BiBranchOp, BiBranchKernel>
{
    BiBranchOp(ONNXTensorElementDataType act, ONNXTensorElementDataType feat)
        : mAct(act)
        , mFeat(feat)
    {
    }
    void* CreateKernel(OrtApi const&, OrtKernelInfo const* info) const { return new BiBranchKernel(info); }
    char const* GetName() const { return "BiBranchAttention"; }
    char const* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
    size_t GetInputTypeCount() const { return kNbInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        switch (i)
        {
        case kWinK:
        case kWinV:
        case kFeatKScales:
        case kFeatVScales: return kF16;
        case kFeatK:
        case kFeatV: return mFeat;
        case kPastLength: return kI64;
        default: return mAct;
        }
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const
    {
        return i >= kNbInputs - contract::kUnscaledDrop ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    }
    size_t GetOutputTypeCount() const { return kNbOutputs; }
    ONNXTensorElementDataType GetOutputType(size_t i) const
    {
        switch (i)
        {
        case kY: return mAct;
        case kFeatKNew:
        case kFeatVNew: return mFeat;
        default: return kF16;
        }
    }
    OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const
    {
        return i >= kNbOutputs - contract::kUnscaledDrop ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    }

    ONNXTensorElementDataType mAct, mFeat;
};

BiBranchOp gBiBranch[] = {{kF32, kI8}, {kF32, kF16}, {kF16, kI8}, {kF16, kF16}};
} // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(
    OrtSessionOptions* options, OrtApiBase const* api)
{
    // built against API 21 (Debian's headers): any newer ONNX Runtime serves it
    Ort::InitApi(api->GetApi(ORT_API_VERSION));
    static std::mutex lock;
    static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains; // must outlive the sessions
    Ort::Status status{nullptr};
    try
    {
        std::lock_guard<std::mutex> g(lock);
        auto domain = std::make_unique<Ort::CustomOpDomain>(contract::kDomain);
        for (auto& op : gBiBranch)
            domain->Add(&op);
        Ort::UnownedSessionOptions(options).Add(*domain);
        domains.push_back(std::move(domain));
    }
    catch (Ort::Exception const& e)
    {
        status = Ort::Status(e);
    }
    return status.release();
}

// What this library implements, for `shrinkrt` to report (no ONNX Runtime needed to ask).
extern "C" __attribute__((visibility("default"))) char const* shrinkrt_ort_ops()
{
    static std::string const what = std::string("BiBranchAttention (") + cpu::isaName() + ")";
    return what.c_str();
}
