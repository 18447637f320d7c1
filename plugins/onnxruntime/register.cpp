// libshrinkrt_ort_ops: the shrinkrt ops as an ONNX Runtime custom-op library (CPU execution provider).
// Registered with SessionOptions.register_custom_ops_library(path); ONNX Runtime then runs these
// kernels for the model's shrinkrt nodes instead of inlining their reference bodies.
//
// Three ops: BiBranchAttention and BiBranchSelfAttention (the same attention, from the layer's own
// projections: q/k before RoPE, x and the down projections instead of c_k/c_v), one kernel template
// over their input positions; and QuantMatMulW4A8 (the ort-cpu graph's 4-bit min layers; the generic
// target's QuantMatMul nodes keep running their bodies, whose fp32 weights ONNX Runtime folds and
// multiplies with its own GEMM). One CustomOp per op and type combination a model can carry
// (activations float32/float16 x feature store fp16 (bits 16) / int8 (bits 8, 4)): ONNX Runtime picks
// the kernel by the node's input types.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include "bibranch_attention.h"
#include "quant_matmul.h"
#include "shrinkrt_ops.gen.h"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace
{
using namespace shrinkrt;
namespace v1 = shrinkrt::contract::BiBranchAttention;
namespace self = shrinkrt::contract::BiBranchSelfAttention;
// the outputs are the same list for both ops
using v1::kY, v1::kWinKOut, v1::kWinVOut, v1::kFeatKNew, v1::kFeatVNew, v1::kFeatKScalesNew, v1::kFeatVScalesNew,
    v1::kNbOutputs, v1::kNbAttributes, v1::kAttributes;
static_assert(static_cast<int>(v1::kNbOutputs) == static_cast<int>(self::kNbOutputs), "one output list");

// An op's input positions (shrinkrt_ops.gen.h): -1 where the op has no such input.
struct Ports
{
    char const* name;
    int q, k, v, cK, cV, x, kDown, vDown, winK, winV, featK, featV, kUp, vUp, kBias, vBias, ropeCos, ropeSin,
        pastLength, featKScales, featVScales, nbInputs, nbAttributes;
};
constexpr Ports kV1{"BiBranchAttention", v1::kQ, v1::kK, v1::kV, v1::kCK, v1::kCV, -1, -1, -1, v1::kWinK, v1::kWinV,
    v1::kFeatK, v1::kFeatV, v1::kKUp, v1::kVUp, v1::kKBias, v1::kVBias, v1::kRopeCos, v1::kRopeSin, v1::kPastLength,
    v1::kFeatKScales, v1::kFeatVScales, v1::kNbInputs, v1::kNbAttributes};
constexpr Ports kSelf{"BiBranchSelfAttention", self::kQ, self::kK, self::kV, -1, -1, self::kX, self::kKDown,
    self::kVDown, self::kWinK, self::kWinV, self::kFeatK, self::kFeatV, self::kKUp, self::kVUp, self::kKBias,
    self::kVBias, self::kRopeCos, self::kRopeSin, self::kPastLength, self::kFeatKScales, self::kFeatVScales,
    self::kNbInputs, self::kNbAttributes};
constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr auto kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
constexpr auto kI64 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;

[[noreturn]] void fail(char const* op, std::string const& what)
{
    ORT_CXX_API_THROW(std::string("shrinkrt::") + op + ": " + what, ORT_INVALID_ARGUMENT);
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

// A factor input (k_up, v_up, k_down, v_down): fp16 tensors are passed as they are (`half`; the kernel
// converts as it loads, so a decode step streams half the bytes), fp32 ones as floats.
Floats factor(Ort::KernelContext& ctx, size_t index, uint16_t const*& half)
{
    Ort::ConstValue v = ctx.GetInput(index);
    auto info = v.GetTensorTypeAndShapeInfo();
    half = nullptr;
    if (info.GetElementType() != kF16)
        return floats(ctx, index);
    Floats f;
    f.shape = info.GetShape();
    half = v.GetTensorData<uint16_t>();
    return f;
}

std::vector<int64_t> shapeOf(Ort::KernelContext& ctx, size_t index)
{
    return ctx.GetInput(index).GetTensorTypeAndShapeInfo().GetShape();
}

// A float output as fp32 for the kernel: the tensor itself, or a scratch copy that store() converts
// into the fp16 tensor when the model's activations are fp16 (the counterpart of floats()).
struct FloatOut
{
    FloatOut(Ort::KernelContext& ctx, size_t index, std::vector<int64_t> const& shape, bool half)
        : value(ctx.GetOutput(index, shape))
        , copy(half ? value.GetTensorTypeAndShapeInfo().GetElementCount() : 0)
        , data(half ? copy.data() : value.GetTensorMutableData<float>())
    {
    }
    void store()
    {
        if (copy.empty())
            return;
        auto* out = value.GetTensorMutableData<uint16_t>();
        for (size_t i = 0; i < copy.size(); ++i)
            out[i] = cpu::floatToHalf(copy[i]);
    }
    Ort::UnownedValue value;
    std::vector<float> copy;
    float* data;
};

// The kernels' ParallelFor over ONNX Runtime's intra-op pool (the session's intra_op_num_threads).
cpu::ParallelFor pool(Ort::KernelContext& ctx)
{
    return [&ctx](size_t n, std::function<void(size_t)> const& fn) {
        if (n == 1)
            return fn(0);
        auto tramp = [](void* user, size_t i) { (*static_cast<std::function<void(size_t)> const*>(user))(i); };
        ctx.ParallelFor(tramp, n, 0, const_cast<std::function<void(size_t)>*>(&fn));
    };
}

// Whether the node carries this (int) attribute: ones added to an op later are optional
bool hasAttribute(Ort::ConstKernelInfo const& ki, char const* name)
{
    try
    {
        ki.GetAttribute<int64_t>(name);
        return true;
    }
    catch (Ort::Exception const&)
    {
        return false;
    }
}

// The first n of an op's int attributes (`names`, contract order) into `fields`; those from index
// `firstAdded` on were added to the op later, so an export from before them has none: 0
void readAttributes(Ort::ConstKernelInfo const& ki, char const* const* names, int n, int firstAdded, int32_t* const* fields)
{
    for (int i = 0; i < n; ++i)
        *fields[i] = i >= firstAdded && !hasAttribute(ki, names[i]) ? 0
                                                                     : static_cast<int32_t>(ki.GetAttribute<int64_t>(names[i]));
}

template <Ports const& P>
struct BiBranchKernel
{
    explicit BiBranchKernel(OrtKernelInfo const* info)
    {
        Ort::ConstKernelInfo ki(info);
        int32_t* fields[] = {&mShape.heads, &mShape.kvHeads, &mShape.headDim, &mShape.window, &mShape.rankK,
            &mShape.rankV, &mShape.bits, &mShape.keyMode, &mShape.queryBits};
        static_assert(sizeof fields / sizeof *fields == self::kNbAttributes);
        // BiBranchAttention's attributes (both ops have them, first, in the same order) and the self form's later ones
        readAttributes(ki, self::kAttributes, P.nbAttributes, kNbAttributes, fields);
        char const* bad = cpu::checkBiBranch(mShape);
        if (*bad)
            fail(P.name, bad);
    }

    void Compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        cpu::BiBranchShape s = mShape;
        int64_t const H = s.heads, G = s.kvHeads, D = s.headDim, W = s.window;
        bool const quant = s.bits < 16;
        size_t const want = P.nbInputs - (quant ? 0 : contract::kUnscaledDrop);
        if (ctx.GetInputCount() != want)
            fail(P.name, "expects " + std::to_string(want) + " inputs at bits " + std::to_string(s.bits) + ", got "
                + std::to_string(ctx.GetInputCount()));
        constexpr bool selfForm = P.x >= 0;
        uint16_t const *kUpH, *vUpH, *kDownH = nullptr, *vDownH = nullptr;
        Floats q = floats(ctx, P.q), k = floats(ctx, P.k), v = floats(ctx, P.v), kUp = factor(ctx, P.kUp, kUpH),
               vUp = factor(ctx, P.vUp, vUpH), kB = floats(ctx, P.kBias), vB = floats(ctx, P.vBias),
               cosT = floats(ctx, P.ropeCos), sinT = floats(ctx, P.ropeSin);
        Floats cK, cV, x, kDown, vDown; // v1: the features; self: x and the down projections
        if constexpr (selfForm)
            x = floats(ctx, P.x), kDown = factor(ctx, P.kDown, kDownH), vDown = factor(ctx, P.vDown, vDownH);
        else
            cK = floats(ctx, P.cK), cV = floats(ctx, P.cV);
        if (q.shape.size() != 3 || q.shape[2] != H * D)
            fail(P.name, "q must be (B, T, num_heads*head_dim)");
        s.batch = q.shape[0];
        s.tokens = q.shape[1];
        auto const win = shapeOf(ctx, P.winK), feat = shapeOf(ctx, P.featK);
        if (win != std::vector<int64_t>{s.batch, G, W, D})
            fail(P.name, "win_k must be (B, num_kv_heads, window, head_dim)");
        if (feat.size() != 3 || feat[0] != s.batch)
            fail(P.name, "feat_k must be (B, S, C)");
        s.capacity = feat[1];
        int64_t const ck = s.bits == 4 ? (s.rankK + 1) / 2 : s.rankK, cv = s.bits == 4 ? (s.rankV + 1) / 2 : s.rankV;
        if (feat[2] != ck || shapeOf(ctx, P.featV) != std::vector<int64_t>{s.batch, s.capacity, cv})
            fail(P.name, "feature stores must be (B, S, C) with C = " + std::to_string(ck) + " / " + std::to_string(cv));
        if constexpr (selfForm)
        {
            int64_t const hidden = x.shape.size() == 3 ? x.shape[2] : -1;
            int64_t const kIn = s.keyMode == contract::kKeyModePostRope ? G * D : hidden;
            if (x.shape != std::vector<int64_t>{s.batch, s.tokens, hidden} || hidden < 1)
                fail(P.name, "x must be (B, T, hidden)");
            if (kDown.shape != std::vector<int64_t>{kIn, s.rankK} || vDown.shape != std::vector<int64_t>{hidden, s.rankV})
                fail(P.name, "k_down must be (" + std::string(kIn == hidden ? "hidden" : "num_kv_heads*head_dim")
                    + ", rank_k) and v_down (hidden, rank_v)");
        }
        else if (cK.shape != std::vector<int64_t>{s.batch, s.tokens, s.rankK}
            || cV.shape != std::vector<int64_t>{s.batch, s.tokens, s.rankV})
            fail(P.name, "c_k / c_v must be (B, T, rank)");
        if (cosT.shape.size() != 2 || cosT.shape[1] != D || cosT.shape[0] < s.capacity)
            fail(P.name, "rope tables must be (>= S, head_dim)");
        int64_t const past = ctx.GetInput(P.pastLength).GetTensorData<int64_t>()[0];
        if (past < 0 || past + s.tokens > s.capacity)
            fail(P.name, "past_length " + std::to_string(past) + " + " + std::to_string(s.tokens) + " tokens exceeds the store's "
                + std::to_string(s.capacity) + " rows");

        cpu::BiBranchIO io{};
        io.q = q.data, io.k = k.data, io.v = v.data, io.cK = cK.data, io.cV = cV.data, io.kUp = kUp.data,
        io.vUp = vUp.data, io.kBias = kB.data, io.vBias = vB.data, io.ropeCos = cosT.data, io.ropeSin = sinT.data;
        io.kUpH = kUpH, io.vUpH = vUpH;
        io.winK = ctx.GetInput(P.winK).GetTensorData<uint16_t>();
        io.winV = ctx.GetInput(P.winV).GetTensorData<uint16_t>();
        io.featK = ctx.GetInput(P.featK).GetTensorRawData();
        io.featV = ctx.GetInput(P.featV).GetTensorRawData();
        io.past = past;
        int64_t const gk = (s.rankK + contract::kFeatureGroup - 1) / contract::kFeatureGroup;
        int64_t const gv = (s.rankV + contract::kFeatureGroup - 1) / contract::kFeatureGroup;
        if (quant)
        {
            io.featKScales = ctx.GetInput(P.featKScales).GetTensorData<uint16_t>();
            io.featVScales = ctx.GetInput(P.featVScales).GetTensorData<uint16_t>();
        }
        FloatOut y(ctx, kY, {s.batch, s.tokens, H * D},
            ctx.GetInput(P.q).GetTensorTypeAndShapeInfo().GetElementType() == kF16);
        io.y = y.data;
        io.winKOut = ctx.GetOutput(kWinKOut, win).GetTensorMutableData<uint16_t>();
        io.winVOut = ctx.GetOutput(kWinVOut, win).GetTensorMutableData<uint16_t>();
        io.featKNew = ctx.GetOutput(kFeatKNew, {s.batch, s.tokens, ck}).GetTensorMutableRawData();
        io.featVNew = ctx.GetOutput(kFeatVNew, {s.batch, s.tokens, cv}).GetTensorMutableRawData();
        if (quant)
        {
            io.featKScalesNew = ctx.GetOutput(kFeatKScalesNew, {s.batch, s.tokens, gk}).GetTensorMutableData<uint16_t>();
            io.featVScalesNew = ctx.GetOutput(kFeatVScalesNew, {s.batch, s.tokens, gv}).GetTensorMutableData<uint16_t>();
        }
        cpu::ParallelFor const parallel = pool(ctx);
        if constexpr (selfForm)
            cpu::biBranchSelfAttention(
                s, io, cpu::BiBranchSelfIO{x.data, kDown.data, vDown.data, x.shape[2], kDownH, vDownH}, parallel);
        else
            cpu::biBranchAttention(s, io, parallel);
        y.store();
    }

    cpu::BiBranchShape mShape{};
};

// One registration per (op, activation dtype, feature dtype).
template <Ports const& P>
struct BiBranchOp : Ort::CustomOpBase<BiBranchOp<P>, BiBranchKernel<P>>
{
    // up, down: the types of k_up, v_up and of k_down, v_down; the activations' unless given
    BiBranchOp(ONNXTensorElementDataType act, ONNXTensorElementDataType feat,
        ONNXTensorElementDataType up = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED,
        ONNXTensorElementDataType down = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
        : mAct(act)
        , mFeat(feat)
        , mUp(up == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED ? act : up)
        , mDown(down == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED ? act : down)
    {
    }
    void* CreateKernel(OrtApi const&, OrtKernelInfo const* info) const { return new BiBranchKernel<P>(info); }
    char const* GetName() const { return P.name; }
    char const* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
    size_t GetInputTypeCount() const { return P.nbInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        int const at = static_cast<int>(i);
        if (at == P.winK || at == P.winV || at == P.featKScales || at == P.featVScales)
            return kF16;
        if (at == P.featK || at == P.featV)
            return mFeat;
        if (at == P.kUp || at == P.vUp)
            return mUp;
        if (at == P.kDown || at == P.vDown)
            return mDown;
        return at == P.pastLength ? kI64 : mAct;
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const
    {
        return i >= static_cast<size_t>(P.nbInputs - contract::kUnscaledDrop) ? INPUT_OUTPUT_OPTIONAL
                                                                                : INPUT_OUTPUT_REQUIRED;
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

    ONNXTensorElementDataType mAct, mFeat, mUp, mDown;
};

BiBranchOp<kV1> gBiBranch[] = {{kF32, kI8}, {kF32, kF16}, {kF16, kI8}, {kF16, kF16}};
// the self form also with fp16 factors in an fp32 graph: the up projections (what the ort-cpu export
// writes post-RoPE), or all four
BiBranchOp<kSelf> gBiBranchSelf[] = {{kF32, kI8}, {kF32, kF16}, {kF16, kI8}, {kF16, kF16}, {kF32, kI8, kF16, kF32},
    {kF32, kF16, kF16, kF32}, {kF32, kI8, kF16, kF16}, {kF32, kF16, kF16, kF16}};

namespace w4a8 = shrinkrt::contract::QuantMatMulW4A8;

constexpr char const* kW4A8Name = "QuantMatMulW4A8";
constexpr auto kI32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;

struct W4A8Kernel
{
    explicit W4A8Kernel(OrtKernelInfo const* info)
    {
        Ort::ConstKernelInfo ki(info);
        int32_t* fields[] = {&mShape.inFeatures, &mShape.outFeatures, &mShape.gated, &mShape.quantizedSums};
        static_assert(sizeof fields / sizeof *fields == w4a8::kNbAttributes);
        // in_features and out_features came with the op; every attribute after them was added later
        readAttributes(ki, w4a8::kAttributes, w4a8::kNbAttributes, 2, fields);
        char const* bad = cpu::checkW4A8(mShape);
        if (*bad)
            fail(kW4A8Name, bad);
    }

    void Compute(OrtKernelContext* context)
    {
        Ort::KernelContext ctx(context);
        cpu::W4A8Shape s = mShape;
        int64_t const K = s.inFeatures, N = s.outFeatures, G = (K + contract::kActBlock - 1) / contract::kActBlock;
        Floats x = floats(ctx, w4a8::kX);
        if (x.shape.empty() || x.shape.back() != K)
            fail(kW4A8Name, "X must be (..., in_features) with in_features " + std::to_string(K));
        s.rows = 1;
        for (size_t i = 0; i + 1 < x.shape.size(); ++i)
            s.rows *= x.shape[i];
        if (shapeOf(ctx, w4a8::kCodes) != std::vector<int64_t>{N, G * 4})
            fail(kW4A8Name, "codes must be (out_features, " + std::to_string(G * 4) + ")");
        if (shapeOf(ctx, w4a8::kScales) != std::vector<int64_t>{N, G} || shapeOf(ctx, w4a8::kMins) != std::vector<int64_t>{N, G})
            fail(kW4A8Name, "scales and mins must be (out_features, " + std::to_string(G) + ")");
        cpu::W4A8IO io{};
        io.x = x.data;
        io.codes = reinterpret_cast<uint32_t const*>(ctx.GetInput(w4a8::kCodes).GetTensorData<int32_t>());
        io.scales = ctx.GetInput(w4a8::kScales).GetTensorData<uint16_t>();
        io.mins = ctx.GetInput(w4a8::kMins).GetTensorData<uint16_t>();
        std::vector<int64_t> yShape = x.shape;
        yShape.back() = s.gated ? N / 2 : N;
        FloatOut y(ctx, w4a8::kY, yShape, ctx.GetInput(w4a8::kX).GetTensorTypeAndShapeInfo().GetElementType() == kF16);
        io.y = y.data;
        cpu::quantMatMulW4A8(s, io, pool(ctx));
        y.store();
    }

    cpu::W4A8Shape mShape{};
};

// One registration per activation dtype.
struct W4A8Op : Ort::CustomOpBase<W4A8Op, W4A8Kernel>
{
    explicit W4A8Op(ONNXTensorElementDataType act)
        : mAct(act)
    {
    }
    void* CreateKernel(OrtApi const&, OrtKernelInfo const* info) const { return new W4A8Kernel(info); }
    char const* GetName() const { return kW4A8Name; }
    char const* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
    size_t GetInputTypeCount() const { return w4a8::kNbInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        return i == w4a8::kX ? mAct : i == w4a8::kCodes ? kI32 : kF16;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return mAct; }

    ONNXTensorElementDataType mAct;
};

W4A8Op gW4A8[] = {W4A8Op{kF32}, W4A8Op{kF16}};
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
        for (auto& op : gBiBranchSelf)
            domain->Add(&op);
        for (auto& op : gW4A8)
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
    static std::string const what = std::string("BiBranchAttention, BiBranchSelfAttention, QuantMatMulW4A8 (") + cpu::isaName() + ")";
    return what.c_str();
}
