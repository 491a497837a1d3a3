// Which instruction-set variant of the CPU kernels runs (x86-64: default, avx2, avx512).
//
// The variant is chosen once when the library loads: the best the CPU supports, or the one named
// by the environment variable AG_KERNELS_CPU_ISA (default|avx2|avx512; one the CPU lacks falls back
// to the best supported, with a message on stderr).  The functions below are private test hooks,
// exposed to Python as ag_kernels._C._cpu_isa(), _cpu_isas() and _set_cpu_isa(name).
#pragma once

#include <string>
#include <vector>

namespace ag_kernels {

// Name of the variant the CPU ops use now.
std::string cpu_isa();

// Names of the variants this CPU and build can run, from the baseline up.
std::vector<std::string> cpu_isas();

// Selects a variant for the calls that follow and returns the previous one's name; throws
// std::invalid_argument for an unknown name or one this CPU cannot run.  Not for concurrent use
// with running ops (a call in flight may finish on the previous variant).
std::string set_cpu_isa(const std::string& name);

}  // namespace ag_kernels
