// Device discovery for a build without CUDA (make CUDA=0).
#include "tm/device.hpp"

namespace tmc {

int cuda_device_count(std::string* why) {
    if (why) *why = "built without CUDA";
    return 0;
}

bool built_with_cuda() { return false; }

}  // namespace tmc
