// tmc::Error: the one exception type the library throws for bad input or
// failed I/O. Its message is a single line that names the file, field or
// request it is about; tools print it as "tm-xxx: error: <message>".
#pragma once

#include <stdexcept>
#include <string>

namespace tmc {

class Error : public std::runtime_error {
public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Thrown when the user interrupts a long operation (SIGINT/SIGTERM).
class Interrupted : public Error {
public:
    Interrupted() : Error("interrupted") {}
};

}  // namespace tmc
