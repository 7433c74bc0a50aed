// Contiguous ranges of [0, tasks) over OpenMP threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include <omp.h>

namespace ettrl {

// f(begin, end) on each of up to `workers` threads (inline when one is enough). OpenMP, not threads of our own:
// the extension links the libgomp torch has already loaded (same soname), so this runs on torch's worker threads
// instead of competing with them for the cores while they spin-wait.
template <typename F>
void parallel_ranges(int64_t tasks, int64_t workers, F&& f) {
  workers = std::max<int64_t>(1, std::min(workers, tasks));
  if (workers == 1) return f(int64_t{0}, tasks);
#pragma omp parallel num_threads(workers)
  {
    const int64_t w = omp_get_thread_num(), n = omp_get_num_threads();
    f(tasks * w / n, tasks * (w + 1) / n);
  }
}

constexpr int64_t kParallelElements = 1 << 13;  // below this, waking a second thread costs more than it saves

// parallel_ranges over rows on all threads, or inline when the work (elements in all) is too small to share out.
template <typename F>
void parallel_rows(int64_t rows, int64_t elements, int num_threads, F&& f) {
  parallel_ranges(rows, elements >= kParallelElements ? num_threads : 1, f);
}

}  // namespace ettrl
