// The allocator of the CPU ops' [N, V] gradients (gradient_cache.cpp): a freed gradient buffer of 1 MiB or more is
// kept and handed to the next gradient of the same byte size, up to KDKERNELS_GRADIENT_CACHE_MB in all (default 2048;
// 0 keeps none). Fresh memory costs a page fault and the operating system's zeroing of every page on first touch,
// which at [1024, 32000] float32 took 16 of a call's 40 ms; a training loop frees each step's gradient before the
// next step asks for one, so the kept buffer is the one the next step would have allocated anyway.
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>

namespace kdkernels::cpu {

c10::Allocator* gradient_allocator();

// Frees every kept buffer; returns their bytes.
size_t release_cached_gradients();

// The bytes of the buffers kept now.
size_t cached_gradient_bytes();

}  // namespace kdkernels::cpu
