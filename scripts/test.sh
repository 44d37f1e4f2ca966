#!/usr/bin/env bash
# Sets up a fresh machine, builds llmq (compiling the CUDA backend when nvcc is found) and runs
# every test; then builds again with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only)
# and runs the tests there too, and last with ThreadSanitizer for the threaded tests. Tests
# labelled `gpu` skip cleanly without a GPU; those labelled `emulated` (the CUDA kernels on the
# CPU) run in the first build, themselves built with ThreadSanitizer (tests/CMakeLists.txt).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
jobs=$(nproc)
bash "$root/scripts/build.sh"
(cd "$root/build" && ctest --output-on-failure -j "$jobs")

# The sanitizer builds keep line tables only (-g1: what their reports print), and ASan's -O1 as its
# documentation suggests: CI's two cores compile them in about half the time of -O2 -g.
cmake -S "$root" -B "$root/build-asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLLMQ_CUDA=OFF \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
  -DLLMQ_SANITIZE=ON >/dev/null
cmake --build "$root/build-asan" -j "$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd "$root/build-asan" && ctest --output-on-failure -j "$jobs")

# ThreadSanitizer over the tests that use threads: the serving runtime (submitters, the server
# thread, pollers), the scheduler, the C ABI's thread-safety tests, the thread pool's users and the
# tensor-parallel ranks with their communicator.
cmake -S "$root" -B "$root/build-tsan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLLMQ_CUDA=OFF \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" \
  -DLLMQ_TSAN=ON >/dev/null
cmake --build "$root/build-tsan" -j "$jobs" --target llmq_tests
export TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
(cd "$root/build-tsan" && ctest --output-on-failure -j "$jobs" -R '^(Server|Scheduler|CapiServer|CapiThreads|PrefixCache|Engine|InProcessCommunicator|RankThreads|TensorParallelEngine)\.')
