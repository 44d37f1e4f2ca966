# Writes host-compilable copies of the W8A16 kernel sources into OUT/kernels/cuda/: the real code,
# with only the PTX primitives (cp.async, mma.sync), the launch syntax, the shared-memory
# declarations and the device attribute calls swapped for the emulator's (emu.h).
import re, sys
root, out = sys.argv[1], sys.argv[2]
src = root + '/kernels/cuda/'
dst = out + '/kernels/cuda/'
c = open(src + 'common.cuh').read()
a = c.index('__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, bf16)')
b = c.index('}  // namespace\n}  // namespace llmq::cuda')
c = c[:a] + 'template <class T> inline void mma16816(float* c, const uint32_t* a, const uint32_t* b, T) { emu_mma(c, a, b, T{}); }\n\n' + c[b:]
open(dst + 'common.cuh', 'w').write('#include "emu.h"\n' + c)
k = open(src + 'w8a16_gemm.cu').read()
a = k.index('// ---- PTX'); b = k.index('// ---- INT8 codes')
k = k[:a] + k[b:]
for old, new in [('extern __shared__ uint4 smem[];', 'uint4* smem = emu_dyn_smem;'),
                 ('__shared__ bool last;', 'static bool last;'),
                 ('cudaFuncSetAttribute(', 'emu_noop('), ('cudaGetDevice(&device);', ''),
                 ('#include "kernels/cuda/common.cuh"', '#include "gen/kernels/cuda/common.cuh"')]:
    assert old in k, old
    k = k.replace(old, new)
k, n = re.subn(r'(\w+)<<<([^,]+), ([^,]+), ([^,]+), ([^>]+)>>>\(', r'emu_launch(\2, \3, \4, \1, ', k)
assert n == 1
open(dst + 'w8a16_gemm.cpp', 'w').write(k)
