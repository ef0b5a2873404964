// A CPU allocator that keeps freed large blocks for reuse (idefics2.kernels.cpu_memory_pool).
//
// Why: a training step allocates and frees gigabytes of activations and gradients in the same sizes every
// step. glibc serves them from its heap after the first step (its mmap threshold rises to the largest freed
// block), where short- and long-lived blocks interleave: freed memory is fragmented, cannot be returned, and
// the resident set grows step after step to about twice the live peak. With a fixed low mmap threshold the
// resident set follows the live memory, but every block is faulted in afresh (~1M page faults a step here).
// This pool maps large blocks once and hands a freed block to the next request of its size (or up to 1/4
// larger): no faults in the steady state, and the footprint stays near the live peak. Cached blocks above a
// cap (twice the live high-water mark) are unmapped, least recently freed first. Small blocks go to the
// allocator that was installed before (torch's default), which handles them well.
#include <torch/library.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include "check.h"
#include <pthread.h>
#include <sys/mman.h>

#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kMinCap = size_t(64) << 20;  // always worth keeping: a few activations of a small model

struct Block {
  void* ptr;
  size_t size;
  std::multimap<size_t, Block*>::iterator by_size;  // valid while cached
  std::list<Block*>::iterator by_age;              // valid while cached
};

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < threshold_ || previous_ == nullptr) {
      return previous_ != nullptr ? previous_->allocate(n) : c10::GetDefaultCPUAllocator()->allocate(n);
    }
    const size_t size = (n + kPage - 1) / kPage * kPage;
    Block* block = nullptr;
    size_t live = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = cached_.lower_bound(size);
      if (it != cached_.end() && it->first <= size + size / 4) {
        block = it->second;
        cached_.erase(it);
        age_.erase(block->by_age);
        cached_bytes_ -= block->size;
        ++hits_;
        track_live_locked(block, live, reserved);
      }
    }
    if (block == nullptr) {  // mapped outside the lock
      void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (ptr == MAP_FAILED) {
        // Memory is short: give back what is cached and try once more before failing like torch does.
        empty_cache();
        ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        IDEFICS2_CHECK(ptr != MAP_FAILED, "idefics2 CPU memory pool: out of memory allocating %zu bytes",
                       static_cast<size_t>(n));
      }
      block = new Block{ptr, size, {}, {}};
      std::lock_guard<std::mutex> guard(mutex_);
      ++misses_;
      mapped_bytes_ += size;
      track_live_locked(block, live, reserved);
    }
    report(block->ptr, static_cast<int64_t>(block->size), live, reserved);
    // Context == data pointer: oneDNN's raw_allocate / raw_deallocate path requires it.
    return {block->ptr, block->ptr, &PoolAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &PoolAllocator::release; }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

  static void release(void* ptr) { instance().give_back(ptr); }

  void give_back(void* ptr) {
    std::vector<Block*> evicted;
    size_t live, reserved;
    Block* block;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = live_.find(ptr);
      if (it == live_.end()) {
        // A small block of the previous allocator, freed through raw_deallocate while the pool was installed.
        if (previous_ != nullptr && previous_->raw_deleter() != nullptr) previous_->raw_deleter()(ptr);
        return;
      }
      block = it->second;
      live_.erase(it);
      live_bytes_ -= block->size;
      if (installed_) {
        cache_locked(block, evicted);
      } else {  // the pool is off: nothing will ask for this block again
        mapped_bytes_ -= block->size;
        evicted.push_back(block);
      }
      live = live_bytes_;
      reserved = live_bytes_ + cached_bytes_;
    }
    report(block->ptr, -static_cast<int64_t>(block->size), live, reserved);
    for (Block* b : evicted) unmap(b);
  }

  void empty_cache() {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      for (auto& entry : cached_) evicted.push_back(entry.second);
      for (Block* b : evicted) mapped_bytes_ -= b->size;
      cached_.clear();
      age_.clear();
      cached_bytes_ = 0;
    }
    for (Block* b : evicted) unmap(b);
  }

  // Installs the pool as torch's CPU allocator (remembering the one it replaces); false where another
  // allocator with a higher priority is installed and torch keeps it.
  bool enable(int64_t threshold) {
    std::lock_guard<std::mutex> guard(mutex_);
    threshold_ = static_cast<size_t>(std::max<int64_t>(threshold, kPage));
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current == this) return true;
    previous_ = current;
    c10::SetCPUAllocator(this, /*priority=*/0);
    installed_ = c10::GetCPUAllocator() == this;
    return installed_;
  }

  // Puts the previous allocator back. Blocks handed out stay valid: they return here when freed.
  void disable() {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (c10::GetCPUAllocator() == this && previous_ != nullptr) c10::SetCPUAllocator(previous_, 0);
      installed_ = false;
    }
    empty_cache();
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {static_cast<int64_t>(installed_), static_cast<int64_t>(live_bytes_),
            static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(peak_live_bytes_),
            static_cast<int64_t>(mapped_bytes_), static_cast<int64_t>(hits_), static_cast<int64_t>(misses_)};
  }

  void reset_peak() {
    std::lock_guard<std::mutex> guard(mutex_);
    peak_live_bytes_ = live_bytes_;
    hits_ = misses_ = 0;
  }

  static PoolAllocator& instance() {
    // Never destroyed: tensors freed during interpreter shutdown still find it.
    static PoolAllocator* pool = [] {
      auto* p = new PoolAllocator();
      // A fork (a DataLoader worker) while another thread holds the lock would leave the child's copy locked.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return p;
    }();
    return *pool;
  }

 private:
  // Caller holds mutex_. Counts a block handed out; `live` / `reserved` are for the profiler report.
  void track_live_locked(Block* block, size_t& live, size_t& reserved) {
    live_.emplace(block->ptr, block);
    live_bytes_ += block->size;
    if (live_bytes_ > peak_live_bytes_) peak_live_bytes_ = live_bytes_;
    live = live_bytes_;
    reserved = live_bytes_ + cached_bytes_;
  }

  // Caller holds mutex_. Blocks pushed to `evicted` are to be unmapped once the lock is released.
  void cache_locked(Block* block, std::vector<Block*>& evicted) {
    block->by_size = cached_.emplace(block->size, block);
    block->by_age = age_.insert(age_.end(), block);
    cached_bytes_ += block->size;
    const size_t cap = std::max(kMinCap, 2 * peak_live_bytes_);
    while (cached_bytes_ > cap) {
      Block* oldest = age_.front();
      age_.pop_front();
      cached_.erase(oldest->by_size);
      cached_bytes_ -= oldest->size;
      mapped_bytes_ -= oldest->size;
      evicted.push_back(oldest);
    }
  }

  static void unmap(Block* block) {
    munmap(block->ptr, block->size);
    delete block;
  }

  static void report(void* ptr, int64_t delta, size_t live, size_t reserved) {
    // Keeps torch.profiler(profile_memory=True) working while the pool is installed.
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(ptr, delta, live, reserved, c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  c10::Allocator* previous_ = nullptr;
  bool installed_ = false;
  size_t threshold_ = size_t(256) << 10;
  std::unordered_map<void*, Block*> live_;
  std::multimap<size_t, Block*> cached_;
  std::list<Block*> age_;
  size_t live_bytes_ = 0, cached_bytes_ = 0, peak_live_bytes_ = 0, mapped_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

bool memory_pool_enable(int64_t threshold) { return PoolAllocator::instance().enable(threshold); }
void memory_pool_disable() { PoolAllocator::instance().disable(); }
void memory_pool_reset_peak() { PoolAllocator::instance().reset_peak(); }
std::vector<int64_t> memory_pool_stats() { return PoolAllocator::instance().stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("memory_pool_enable(int threshold) -> bool", &memory_pool_enable);
  m.def("memory_pool_disable() -> ()", &memory_pool_disable);
  m.def("memory_pool_reset_peak() -> ()", &memory_pool_reset_peak);
  m.def("memory_pool_stats() -> int[]", &memory_pool_stats);
}
