// The x86-64-v3 CPU check nolad runs first in main. This file and cpu_features.c are compiled without
// -march=x86-64-v3 (the CImageSupport target has no such flag), so the check cannot itself fault.
#ifndef NOLAD_CPU_FEATURES_H
#define NOLAD_CPU_FEATURES_H

#include <stdint.h>

// One bit per x86-64-v3 feature beyond x86-64-v2 that the compiler may use, plus the operating system's
// support for saving AVX registers (without it AVX instructions fault even on a CPU that has them).
#define NOLAD_CPU_AVX 0x001u
#define NOLAD_CPU_AVX2 0x002u
#define NOLAD_CPU_FMA 0x004u
#define NOLAD_CPU_BMI1 0x008u
#define NOLAD_CPU_BMI2 0x010u
#define NOLAD_CPU_F16C 0x020u
#define NOLAD_CPU_LZCNT 0x040u
#define NOLAD_CPU_MOVBE 0x080u
#define NOLAD_CPU_OS_AVX_STATE 0x100u

/// The features above that this CPU and OS provide, from CPUID and XGETBV; 0 on other architectures.
uint32_t nolad_cpu_x86_features(void);

#endif
