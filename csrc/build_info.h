// What the compiled extension holds (defined in ops.cpp; used by module.cpp).
#pragma once

#include <string>

namespace fastadv {

// As JSON: torch version, CUDA on/off, CUDA archs and runtime, CPU variants, compiler.
std::string build_info_json();

}  // namespace fastadv
