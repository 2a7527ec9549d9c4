#include "cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

uint32_t nolad_cpu_x86_features(void) {
    unsigned int eax, ebx, ecx, edx;
    uint32_t features = 0;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
    if (ecx & (1u << 12)) features |= NOLAD_CPU_FMA;
    if (ecx & (1u << 22)) features |= NOLAD_CPU_MOVBE;
    if (ecx & (1u << 28)) features |= NOLAD_CPU_AVX;
    if (ecx & (1u << 29)) features |= NOLAD_CPU_F16C;
    if (ecx & (1u << 27)) {  // OSXSAVE: XGETBV is available; XCR0 bits 1 and 2 = SSE and AVX state enabled
        unsigned int lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & 6u) == 6u) features |= NOLAD_CPU_OS_AVX_STATE;
    }
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
        if (ebx & (1u << 3)) features |= NOLAD_CPU_BMI1;
        if (ebx & (1u << 5)) features |= NOLAD_CPU_AVX2;
        if (ebx & (1u << 8)) features |= NOLAD_CPU_BMI2;
    }
    if (__get_cpuid(0x80000001u, &eax, &ebx, &ecx, &edx)) {
        if (ecx & (1u << 5)) features |= NOLAD_CPU_LZCNT;  // ABM
    }
    return features;
}

#else

uint32_t nolad_cpu_x86_features(void) { return 0; }

#endif
