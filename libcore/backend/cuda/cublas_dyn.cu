#include <dlfcn.h>

#include "backend/cuda/cublas_dyn.hpp"
#include "tm/error.hpp"

namespace tmc::cuda {

const Cublas& cublas() {
    static Cublas c = [] {
        const char* names[] = {"libcublas.so.13", "libcublas.so", "/usr/local/cuda/lib64/libcublas.so.13"};
        void* h = nullptr;
        std::string why;
        for (const char* n : names) {
            h = dlopen(n, RTLD_NOW | RTLD_LOCAL);
            if (h) break;
            why = dlerror();
        }
        if (!h) throw Error("cannot load cuBLAS (" + why + ")");
        auto sym = [&](const char* s) {
            void* p = dlsym(h, s);
            if (!p) throw Error(std::string("cuBLAS lacks ") + s);
            return p;
        };
        Cublas t;
        t.create = reinterpret_cast<decltype(t.create)>(sym("cublasCreate_v2"));
        t.destroy = reinterpret_cast<decltype(t.destroy)>(sym("cublasDestroy_v2"));
        t.set_stream = reinterpret_cast<decltype(t.set_stream)>(sym("cublasSetStream_v2"));
        t.set_workspace = reinterpret_cast<decltype(t.set_workspace)>(sym("cublasSetWorkspace_v2"));
        t.set_math_mode = reinterpret_cast<decltype(t.set_math_mode)>(sym("cublasSetMathMode"));
        t.gemm_ex = reinterpret_cast<decltype(t.gemm_ex)>(sym("cublasGemmEx"));
        return t;
    }();
    return c;
}

}  // namespace tmc::cuda
