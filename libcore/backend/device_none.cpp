// Device discovery for a build without CUDA (make CUDA=0).
#include "backend/backend.hpp"
#include "tm/device.hpp"
#include "tm/error.hpp"

namespace tmc {

int cuda_device_count(std::string* why) {
    if (why) *why = "built without CUDA";
    return 0;
}

bool built_with_cuda() { return false; }

void cuda_prepare_for_ranks(int) {}

bool cuda_eager_loading() { return true; }

std::unique_ptr<Backend> make_cuda_backend(const Workspace&, const CudaBackendOptions&) {
    throw Error("this build has no CUDA backend (built with CUDA=0); use --device cpu");
}

std::unique_ptr<Backend> make_cuda_tp_backend(const Workspace& ws, const CudaBackendOptions& opt) {
    return make_cuda_backend(ws, opt);
}

}  // namespace tmc
