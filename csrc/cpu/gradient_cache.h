// The allocator of the CPU ops' [N, V] gradients (gradient_cache.cpp). Fresh memory costs a page fault and the
// operating system's zeroing of every page on first touch, which is a large part of a training step's loss call
// (docs/losses.md, section 6): a freed gradient buffer of 1 MiB or more is kept, and the next gradient takes the
// smallest kept buffer that holds it, whatever its size. What is kept is bounded by the most gradient bytes that were
// ever in use at once (one step's gradient in a training loop, whose steps free theirs before the next asks) and by
// KDKERNELS_GRADIENT_CACHE_MB (default 2048; 0 keeps none; anything but a non-negative integer is refused): a loop
// whose shapes vary keeps about its largest step's gradient, not one buffer per shape.
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
