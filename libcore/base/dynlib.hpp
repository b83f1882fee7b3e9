// Libraries loaded at run time (cuBLAS, NCCL), so that tm's binaries start
// on machines without them: the first of several names that opens, and its
// symbols, each failure a tmc::Error naming the library.
#pragma once

#include <dlfcn.h>

#include <initializer_list>
#include <string>

#include "tm/error.hpp"

namespace tmc {

class DynLib {
public:
    DynLib(const std::string& what, std::initializer_list<const char*> names) : what_(what) {
        std::string why;
        for (const char* n : names) {
            h_ = dlopen(n, RTLD_NOW | RTLD_LOCAL);
            if (h_) return;
            why = dlerror();
        }
        throw Error("cannot load " + what + " (" + why + ")");
    }
    // The library stays loaded for the life of the process.
    template <class F>
    void get(F& fn, const char* symbol) const {
        void* p = dlsym(h_, symbol);
        if (!p) throw Error(what_ + " lacks " + symbol);
        fn = reinterpret_cast<F>(p);
    }

private:
    std::string what_;
    void* h_ = nullptr;
};

}  // namespace tmc
