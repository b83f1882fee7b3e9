// A CUDA build must start and answer on a machine without a GPU or driver:
// the runtime is linked statically and reports "no device" as a value.
#include "tm/device.hpp"

#include <gtest/gtest.h>

TEST(Device, ProbeNeverFailsWithoutAGpu) {
    std::string why;
    int n = tmc::cuda_device_count(&why);
    EXPECT_GE(n, 0);
    if (n == 0) EXPECT_FALSE(why.empty());
    if (!tmc::built_with_cuda()) EXPECT_EQ(n, 0);
}
