#include "tm/dtype.hpp"

#include "tm/error.hpp"

namespace tmc {

size_t dtype_size(DType t) {
    switch (t) {
        case DType::F32: return 4;
        case DType::F16: return 2;
        case DType::BF16: return 2;
        case DType::I8: return 1;
        case DType::U8: return 1;
        case DType::I32: return 4;
        case DType::I64: return 8;
    }
    return 0;
}

const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "fp32";
        case DType::F16: return "fp16";
        case DType::BF16: return "bf16";
        case DType::I8: return "int8";
        case DType::U8: return "uint8";
        case DType::I32: return "int32";
        case DType::I64: return "int64";
    }
    return "?";
}

std::optional<DType> dtype_from_name(std::string_view s) {
    if (s == "fp32") return DType::F32;
    if (s == "fp16") return DType::F16;
    if (s == "bf16") return DType::BF16;
    if (s == "int8") return DType::I8;
    if (s == "uint8") return DType::U8;
    if (s == "int32") return DType::I32;
    if (s == "int64") return DType::I64;
    return std::nullopt;
}

std::optional<DType> dtype_from_safetensors(std::string_view s) {
    if (s == "F32") return DType::F32;
    if (s == "F16") return DType::F16;
    if (s == "BF16") return DType::BF16;
    if (s == "I8") return DType::I8;
    if (s == "U8") return DType::U8;
    if (s == "I32") return DType::I32;
    if (s == "I64") return DType::I64;
    return std::nullopt;
}

float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                --exp;
            }
            man &= 0x3ff;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000;
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00);  // NaN
    if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00);  // overflow -> inf
    if (absu < 0x38800000u) {                                   // subnormal or zero
        if (absu < 0x33000000u) return uint16_t(sign);
        uint32_t exp = absu >> 23;
        uint32_t man = (absu & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - exp;  // 14 + (113 - exp)
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) ++half;
        return uint16_t(sign | half);
    }
    uint32_t r = absu + 0xfffu + ((absu >> 13) & 1u) - (uint32_t(112) << 23);
    return uint16_t(sign | (r >> 13));
}

void convert_floats(DType from, const void* src, DType to, void* dst, size_t n) {
    if (from == to) {
        std::memcpy(dst, src, n * dtype_size(from));
        return;
    }
    auto load = [&](size_t i) -> float {
        switch (from) {
            case DType::F32: return static_cast<const float*>(src)[i];
            case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
            case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
            default: throw Error(std::string("cannot convert from ") + dtype_name(from));
        }
    };
    switch (to) {
        case DType::F32:
            for (size_t i = 0; i < n; ++i) static_cast<float*>(dst)[i] = load(i);
            break;
        case DType::F16:
            for (size_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_f16(load(i));
            break;
        case DType::BF16:
            for (size_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_bf16(load(i));
            break;
        default: throw Error(std::string("cannot convert to ") + dtype_name(to));
    }
}

}  // namespace tmc
