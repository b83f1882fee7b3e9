// What every tm tool's main() shares: the "tm-xxx: error: ..." convention
// and exit codes (0 ok, 1 failure, 2 usage).
#pragma once

#include <cstdio>
#include <exception>
#include <string>

namespace tmc::tool {

struct UsageError : std::exception {
    std::string msg;
    explicit UsageError(std::string m) : msg(std::move(m)) {}
    const char* what() const noexcept override { return msg.c_str(); }
};

inline int fail(const char* prog, const std::string& msg, int code = 1) {
    std::fprintf(stderr, "%s: error: %s\n", prog, msg.c_str());
    return code;
}

}  // namespace tmc::tool
