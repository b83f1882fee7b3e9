// Element types of tensors on disk and in memory, and conversions between
// the 16-bit float formats and fp32.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

namespace tmc {

enum class DType : uint8_t { F32, F16, BF16, I8, U8, I32, I64 };

size_t dtype_size(DType t);
// The workspace's lowercase spelling: "fp32", "fp16", "bf16", "int8", ...
const char* dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view s);
// Safetensors' spelling: "F32", "F16", "BF16", "I8", ...
std::optional<DType> dtype_from_safetensors(std::string_view s);

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements between float types (F32, F16, BF16).
void convert_floats(DType from, const void* src, DType to, void* dst, size_t n);

}  // namespace tmc
