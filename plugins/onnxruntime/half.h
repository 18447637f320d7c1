// fp16 <-> fp32 by ONNX Runtime's own conversions (round to nearest even), for the CPU library.
#pragma once

#include "onnxruntime_float16.h"

#include <cstdint>

namespace shrinkrt
{
namespace cpu
{
struct Half : onnxruntime_float16::Float16Impl<Half>
{
    static uint16_t fromFloat(float f) { return ToUint16Impl(f); }
    static float toFloat(uint16_t h)
    {
        Half x;
        x.val = h;
        return x.ToFloatImpl();
    }
};
} // namespace cpu
} // namespace shrinkrt
