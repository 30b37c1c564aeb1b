// A small caching allocator for the large outputs of our CPU ops.
//
// Why: a fresh CPU tensor of tens of MB comes from mmap, and its first write takes a page fault per
// 4 KB page, each zeroing the page in the kernel. On the machines we measured, writing a fresh 40 MB
// output that way cost several times the copy itself, so an op that returns a new tensor every step
// (a gather) was bound by page faults, not by memory bandwidth. The CUDA caching allocator solves the
// same problem on the GPU; PyTorch's default CPU allocator does not cache.
//
// What: outputs of at least kPoolMinBytes (32 MB) are carved from blocks that go back to this pool when their
// tensor dies, and are handed out again to the next request of about the same size (block sizes are
// rounded up to 2 MB, and a cached block is reused for any request it covers with at most 1/8 waste).
// New blocks are plain mmap'ed memory (MADV_HUGEPAGE was tried: with the common `defrag=madvise`
// setting the first touch then waits for memory compaction, which made misses slower). The pool keeps at most `limit`
// bytes of free blocks (IWM_KERNELS_CPU_POOL_MB, default 1024; 0 disables it); beyond that, freed
// blocks go back to the OS. Only our ops' outputs live here; nothing else in the process is affected.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/Storage.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace iwm {

// glibc serves requests below its largest mmap threshold (32 MB on 64-bit) from its heap once a block
// of that size was freed, reusing recently touched (cache-warm) memory, which measured faster than a
// cold pooled block; from 32 MB up it maps fresh pages on every request, which the pool avoids.
constexpr size_t kPoolMinBytes = size_t{32} << 20;
constexpr size_t kPoolGranule = size_t{2} << 20;   // 2 MB: one huge page

class OutputPool final : public c10::Allocator {
 public:
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // leaked: tensors may die after static destructors ran
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = round_up(n == 0 ? 1 : n);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 8) {
        ptr = it->second;
        cached_ -= it->first;
        const size_t got = it->first;
        free_.erase(it);
        ++hits_;
        return make(ptr, got);
      }
      ++misses_;
    }
    ptr = map_block(size);
    return make(ptr, size);
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  bool enabled() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_ > 0;
  }

  // Sets the most bytes of free blocks kept (0 disables the pool and empties it); returns the old limit.
  int64_t set_limit(int64_t bytes) {
    std::vector<std::pair<void*, size_t>> drop;
    int64_t old;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = static_cast<int64_t>(limit_);
      limit_ = bytes > 0 ? static_cast<size_t>(bytes) : 0;
      while (cached_ > limit_ && !free_.empty()) {
        auto last = std::prev(free_.end());
        drop.emplace_back(last->second, last->first);
        cached_ -= last->first;
        free_.erase(last);
      }
    }
    for (auto& [p, s] : drop) unmap_block(p, s);
    return old;
  }

  // [limit bytes, cached free bytes, hits, misses]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(limit_), static_cast<int64_t>(cached_), hits_, misses_};
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  OutputPool() {
    const char* env = std::getenv("IWM_KERNELS_CPU_POOL_MB");
    long long mb = 1024;
    if (env != nullptr && *env != '\0') mb = std::atoll(env);
    limit_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  static size_t round_up(size_t n) { return (n + kPoolGranule - 1) / kPoolGranule * kPoolGranule; }

  static void* map_block(size_t size) {
#if defined(__linux__)
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "iwm output pool: out of memory allocating ", size, " bytes");
    return p;
#else
    void* p = std::aligned_alloc(64, size);
    TORCH_CHECK(p != nullptr, "iwm output pool: out of memory allocating ", size, " bytes");
    return p;
#endif
  }

  static void unmap_block(void* p, size_t size) {
#if defined(__linux__)
    munmap(p, size);
#else
    (void)size;
    std::free(p);
#endif
  }

  c10::DataPtr make(void* ptr, size_t size) {
    return {ptr, new Block{ptr, size}, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    get().give_back(block->ptr, block->size);
    delete block;
  }

  void give_back(void* ptr, size_t size) {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (size > limit_) {
        drop.emplace_back(ptr, size);
      } else {
        while (cached_ + size > limit_ && !free_.empty()) {  // make room: largest blocks go first
          auto last = std::prev(free_.end());
          drop.emplace_back(last->second, last->first);
          cached_ -= last->first;
          free_.erase(last);
        }
        free_.emplace(size, ptr);
        cached_ += size;
      }
    }
    for (auto& [p, s] : drop) unmap_block(p, s);
  }

  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

// A new contiguous CPU tensor; large ones come from the pool (while it is enabled).
inline at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  auto& pool = OutputPool::get();
  if (nbytes < kPoolMinBytes || !pool.enabled()) return at::empty(sizes, options);
  c10::Storage storage(c10::Storage::use_byte_size_t(), static_cast<int64_t>(nbytes), &pool, /*resizable=*/true);
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes[d];
  }
  return at::empty({0}, options).set_(storage, 0, sizes, strides);
}

}  // namespace iwm
