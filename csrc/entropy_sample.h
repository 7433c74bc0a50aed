// entropy_sample on the CPU for float32 logits without top-k / top-p: one token per row by keyed Gumbel-max, its
// logprob and the row's full-vocabulary entropy, in a few passes over the row while it sits in L2. The semantics
// and the noise are kernels/sampling.py's and kernels/noise.py's; the torch path there is the reference.
#pragma once

#include <cstdint>

namespace ettrl {

struct EntropySampleArgs {
  const float* logits;     // [batch, vocab]
  const float* inv_temp;   // [batch] 1 / T (1 for greedy rows)
  const uint8_t* greedy;   // [batch] T == 0: argmax, no noise
  const int32_t* keys;     // [batch] noise keys (noise.row_keys)
  const int64_t* exclude;  // [batch] token that may not be sampled, or -1
  int64_t* tokens;         // [batch] out; -1 where the row has NaN / +inf logits or no allowed finite token
  float* logprobs;         // [batch] out: log softmax(x)[token]
  float* entropies;        // [batch] out: entropy of softmax(x) over the whole vocabulary
  int64_t batch, vocab;
  int num_threads;
};

void entropy_sample_rows(const EntropySampleArgs& args);

}  // namespace ettrl
