// The CPU ops' gradient allocator (gradient_cache.h): buffers of at least MIN_KEPT_BYTES come from, and return to, a
// list of freed buffers matched by exact byte size; smaller ones are the CPU allocator's (its heap reuses them
// without faults).
#include "gradient_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
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

size_t kept_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("KDKERNELS_GRADIENT_CACHE_MB");
    return size_t(env != nullptr ? std::strtoull(env, nullptr, 10) : 2048) << 20;
  }();
  return limit;
}

class GradientCache;
GradientCache& instance();

struct Buffer {
  void* data;
  size_t bytes;
};

class GradientCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < MIN_KEPT_BYTES || kept_limit() == 0) return c10::GetCPUAllocator()->allocate(bytes);
    void* data = take(bytes);
    if (data == nullptr) {
      data = c10::alloc_cpu(bytes);
      advise_huge_pages(data, bytes);
    }
    return {data, new Buffer{data, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  size_t release() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t bytes = kept_bytes_;
    for (const Buffer& b : kept_) c10::free_cpu(b.data);
    kept_.clear();
    kept_bytes_ = 0;
    return bytes;
  }

  size_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return kept_bytes_;
  }

 private:
  // The most recently freed buffer of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* data = it->data;
      kept_.erase(std::next(it).base());
      kept_bytes_ -= bytes;
      return data;
    }
    return nullptr;
  }

  // A gradient's storage is freed: keep its buffer, the oldest kept ones making room (or free it if it alone is
  // over the limit).
  static void give_back(void* context) {
    const Buffer buffer = *static_cast<Buffer*>(context);
    delete static_cast<Buffer*>(context);
    GradientCache& self = instance();
    std::lock_guard<std::mutex> lock(self.mutex_);
    if (buffer.bytes > kept_limit()) return c10::free_cpu(buffer.data);
    while (self.kept_bytes_ + buffer.bytes > kept_limit()) {
      c10::free_cpu(self.kept_.front().data);
      self.kept_bytes_ -= self.kept_.front().bytes;
      self.kept_.erase(self.kept_.begin());
    }
    self.kept_.push_back(buffer);
    self.kept_bytes_ += buffer.bytes;
  }

  std::mutex mutex_;
  std::vector<Buffer> kept_;  // oldest first
  size_t kept_bytes_ = 0;
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
