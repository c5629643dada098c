// The CPU ops' gradient allocator (gradient_cache.h): buffers of at least MIN_KEPT_BYTES come from, and return to, a
// list of freed buffers, the smallest that holds a gradient serving it; smaller ones are the CPU allocator's (its heap
// reuses them without faults).
#include "gradient_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace kdkernels::cpu {
namespace {

constexpr size_t MIN_KEPT_BYTES = size_t(1) << 20;

// Asks the kernel for transparent huge pages under fresh memory before it is first written: faulting it in 4 KB
// pages costs about as much as writing it. Only with transparent huge pages in "madvise" mode (the usual default)
// does this change anything; torch's allocator does the same for all its allocations with THP_MEM_ALLOC_ENABLE=1.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE_PAGE = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  const uintptr_t last = (begin + bytes) & ~(HUGE_PAGE - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// KDKERNELS_GRADIENT_CACHE_MB in bytes, read once; anything but a non-negative integer is refused. Every gradient
// allocation reads it first, so a bad value raises (ValueError) before any buffer is handed out.
size_t kept_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("KDKERNELS_GRADIENT_CACHE_MB");
    if (env == nullptr) return size_t(2048) << 20;
    const std::string text(env);
    const bool digits = !text.empty() && text.size() <= 12 &&
                        std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
    TORCH_CHECK_VALUE(digits, "KDKERNELS_GRADIENT_CACHE_MB must be a non-negative integer of at most 12 digits ",
                      "(megabytes of freed CPU gradients kept for reuse; 0 keeps none), got '", text, "'");
    return size_t(std::stoull(text)) << 20;
  }();
  return limit;
}

class GradientCache;
GradientCache& instance();

// A handed-out buffer: its allocation and the bytes the gradient asked for (at most its capacity).
struct Buffer {
  void* data;
  size_t capacity;
  size_t bytes;
};

class GradientCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (kept_limit() == 0 || bytes < MIN_KEPT_BYTES) return c10::GetCPUAllocator()->allocate(bytes);
    Buffer buffer = take(bytes);
    if (buffer.data == nullptr) {
      buffer.data = c10::alloc_cpu(bytes);
      advise_huge_pages(buffer.data, bytes);
    }
    return {buffer.data, new Buffer(buffer), &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Frees the kept buffers; the bound starts again from the gradients in use now.
  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t bytes = kept_bytes_;
    for (const Buffer& b : kept_) c10::free_cpu(b.data);
    kept_.clear();
    kept_bytes_ = 0;
    peak_in_use_ = in_use_;
    return bytes;
  }

  size_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_bytes_;
  }

 private:
  // The smallest kept buffer of at least `bytes` (taken out of the cache), or one with no data; counts `bytes` in use.
  Buffer take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ += bytes;
    peak_in_use_ = std::max(peak_in_use_, in_use_);
    auto fits = std::lower_bound(kept_.begin(), kept_.end(), bytes,
                                 [](const Buffer& b, size_t want) { return b.capacity < want; });
    if (fits == kept_.end()) return {nullptr, bytes, bytes};
    Buffer buffer = *fits;
    kept_.erase(fits);
    kept_bytes_ -= buffer.capacity;
    return {buffer.data, buffer.capacity, bytes};
  }

  // A gradient's storage is freed: keep its buffer (sorted by capacity), the smallest kept ones making room while
  // the kept bytes pass the bound: the limit, and the most bytes ever in use at once (what the next step may ask).
  static void give_back(void* context) {
    const Buffer buffer = *static_cast<Buffer*>(context);
    delete static_cast<Buffer*>(context);
    GradientCache& self = instance();
    std::lock_guard<std::mutex> lock(self.mutex_);
    self.in_use_ -= buffer.bytes;
    const size_t bound = std::min(kept_limit(), self.peak_in_use_);
    if (buffer.capacity > bound) return c10::free_cpu(buffer.data);
    auto at = std::lower_bound(self.kept_.begin(), self.kept_.end(), buffer.capacity,
                               [](const Buffer& b, size_t capacity) { return b.capacity < capacity; });
    self.kept_.insert(at, buffer);
    self.kept_bytes_ += buffer.capacity;
    while (self.kept_bytes_ > bound) {
      c10::free_cpu(self.kept_.front().data);
      self.kept_bytes_ -= self.kept_.front().capacity;
      self.kept_.erase(self.kept_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Buffer> kept_;  // by capacity, smallest first
  size_t kept_bytes_ = 0;
  size_t in_use_ = 0;       // bytes asked for by the gradients handed out and not yet freed
  size_t peak_in_use_ = 0;  // the most of them at once (since the last release)
};

// Never destroyed: a gradient freed while the process exits still finds it.
GradientCache& instance() {
  static GradientCache* cache = new GradientCache();
  return *cache;
}

}  // namespace

c10::Allocator* gradient_allocator() {
  return &instance();
}

size_t release_cached_gradients() {
  return instance().release();
}

size_t cached_gradient_bytes() {
  return instance().kept_bytes();
}

}  // namespace kdkernels::cpu
