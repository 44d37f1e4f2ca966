// The project's random numbers: xoshiro256** seeded through splitmix64. Fixed, portable output for
// a given seed (std::*_distribution differs between standard libraries), used by the sampler and
// by the synthetic checkpoint writer.
#pragma once

#include <cstdint>

namespace llmq {

// One splitmix64 step: a good 64-bit mix of x + the golden-ratio increment.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

class Rng {
 public:
  // splitmix64 spreads any seed (0 included) over the state, which must not be all zero.
  explicit Rng(uint64_t seed) {
    for (uint64_t& s : s_) {
      s = splitmix64(seed);
      seed += 0x9e3779b97f4a7c15ull;
    }
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  // Uniform in [0, 1), from the top 53 bits.
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

}  // namespace llmq
