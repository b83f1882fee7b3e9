// Small file helpers the tools share with the library.
#pragma once

#include <string>

namespace tmc {

// Reads a whole (small) file into a string; throws tmc::Error naming the path.
std::string read_file(const std::string& path);
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);

}  // namespace tmc
