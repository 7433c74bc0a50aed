// ETTRL_CLONES: compile a function for AVX-512, AVX2 and the baseline; the loader picks the widest the CPU has
// (ifunc), so one build runs fast on every x86-64 machine.
#pragma once

#if defined(__x86_64__) && defined(__linux__)
#define ETTRL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ETTRL_CLONES
#endif
