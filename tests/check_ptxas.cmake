# Compiles kernels/cuda/w8a16_gemm.cu for sm_90a with ptxas's report (-Xptxas -v) and fails when
# ptxas says it serializes the warpgroup MMAs of a kernel that the timed path choice may take:
#   C7513 / C7518 "wgmma.mma_async instructions are serialized ..." (fragments written inside an
#   open wgmma group; accumulators read in a path it takes as divergent), and C7517 "warpgroup.wait
#   is injected" (a wait the code did not ask for). Only a GPU would show these, as a slow kernel.
# The copier-warpgroup form (wgmma_w8a16_kernel<T, true>, forced-only) is known to get C7513 at
# 168 registers and is reported, not failed. Run as a test:
#   cmake -DNVCC=nvcc -DSOURCE_DIR=<repository root> -DOUTPUT=<scratch .cubin> -P check_ptxas.cmake
cmake_minimum_required(VERSION 3.25)

foreach(var NVCC SOURCE_DIR OUTPUT)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_ptxas.cmake: pass -D${var}=...")
  endif()
endforeach()

execute_process(
  COMMAND "${NVCC}" -std=c++17 -O3 -DNDEBUG -DFMT_HEADER_ONLY=1 -DLLMQ_HAVE_CUDA=1 -I${SOURCE_DIR}/include
          -I${SOURCE_DIR} -arch=sm_90a -cubin -Xptxas -v -o "${OUTPUT}" ${SOURCE_DIR}/kernels/cuda/w8a16_gemm.cu
  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed (${rc}):\n${out}\n${err}")
endif()

string(REPLACE "\n" ";" lines "${out}\n${err}")
set(failures "")
set(known "")
foreach(line IN LISTS lines)
  if(NOT line MATCHES "\\((C7513|C7517|C7518)\\)")
    continue()
  endif()
  if(line MATCHES "wgmma_w8a16_kernel[^ ]*Lb1E")  # the copier form
    string(APPEND known "  ${line}\n")
  else()
    string(APPEND failures "  ${line}\n")
  endif()
endforeach()
if(NOT known STREQUAL "")
  message(STATUS "known, in the forced-only copier form:\n${known}")
endif()
if(NOT failures STREQUAL "")
  message(FATAL_ERROR "ptxas serializes or waits on warpgroup MMAs:\n${failures}")
endif()
message(STATUS "no serialized warpgroup MMAs outside the copier form")
