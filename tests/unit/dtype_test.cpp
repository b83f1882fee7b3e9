#include "tm/dtype.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

TEST(DType, Bf16RoundTripAndRounding) {
    EXPECT_EQ(tmc::bf16_to_f32(tmc::f32_to_bf16(1.0f)), 1.0f);
    EXPECT_EQ(tmc::bf16_to_f32(tmc::f32_to_bf16(-2.5f)), -2.5f);
    EXPECT_TRUE(std::isnan(tmc::bf16_to_f32(tmc::f32_to_bf16(NAN))));
    // 1 + 2^-8 is halfway between two bf16 values: rounds to even (1.0).
    EXPECT_EQ(tmc::bf16_to_f32(tmc::f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
}

TEST(DType, F16MatchesReferenceOnAllValues) {
    // Every finite f16 value survives f16 -> f32 -> f16.
    for (uint32_t h = 0; h < 0x10000; ++h) {
        if ((h & 0x7c00) == 0x7c00) continue;
        float f = tmc::f16_to_f32(uint16_t(h));
        ASSERT_EQ(tmc::f32_to_f16(f), h) << h;
    }
    EXPECT_EQ(tmc::f32_to_f16(1e6f), 0x7c00);
    EXPECT_EQ(tmc::f16_to_f32(0x3c00), 1.0f);
    EXPECT_EQ(tmc::f16_to_f32(0x0001), std::ldexp(1.0f, -24));
}
