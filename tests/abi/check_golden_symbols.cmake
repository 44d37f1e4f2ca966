# Compares the dynamic symbols that libllmq.so defines (nm -D --defined-only: type and
# name@version) with the golden list tests/abi/exported_symbols.txt. Run as a test:
#   cmake -DLIBRARY=libllmq.so -DNM=nm -DGOLDEN=tests/abi/exported_symbols.txt -P check_golden_symbols.cmake
# A symbol that disappeared or changed is an ABI break: every program linked against it stops
# loading. A new symbol is fine, but it is part of the ABI from then on, so the golden list must be
# updated in the same commit (the failure message says how).
cmake_minimum_required(VERSION 3.25)

foreach(var LIBRARY NM GOLDEN)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_golden_symbols.cmake: pass -D${var}=...")
  endif()
endforeach()

execute_process(COMMAND "${NM}" -D --defined-only "${LIBRARY}"
  OUTPUT_VARIABLE nm_out ERROR_VARIABLE nm_err RESULT_VARIABLE nm_rc)
if(NOT nm_rc EQUAL 0)
  message(FATAL_ERROR "${NM} -D --defined-only ${LIBRARY} failed (${nm_rc}): ${nm_err}")
endif()

# "ADDRESS TYPE NAME" -> "TYPE NAME", as awk '{print $2, $3}' writes it.
set(actual "")
string(REPLACE "\n" ";" lines "${nm_out}")
foreach(line IN LISTS lines)
  if(line MATCHES "^[0-9a-fA-F]* *([A-Za-z]) +([^ ]+)$")
    list(APPEND actual "${CMAKE_MATCH_1} ${CMAKE_MATCH_2}")
  elseif(NOT line STREQUAL "")
    message(FATAL_ERROR "cannot parse nm output line: '${line}'")
  endif()
endforeach()
list(SORT actual)

file(STRINGS "${GOLDEN}" golden)
list(SORT golden)

set(removed "")
foreach(entry IN LISTS golden)
  if(NOT entry IN_LIST actual)
    string(APPEND removed "  - ${entry}\n")
  endif()
endforeach()
set(added "")
foreach(entry IN LISTS actual)
  if(NOT entry IN_LIST golden)
    string(APPEND added "  + ${entry}\n")
  endif()
endforeach()

if(NOT removed STREQUAL "" OR NOT added STREQUAL "")
  set(text "libllmq.so's exported symbols differ from the golden list ${GOLDEN}.\n")
  if(NOT removed STREQUAL "")
    string(APPEND text "Gone or changed (an ABI break: programs linked against them no longer load):\n${removed}")
  endif()
  if(NOT added STREQUAL "")
    string(APPEND text "New (part of the ABI once released):\n${added}")
  endif()
  string(APPEND text "If the change is intended, update the golden list in the same commit, from the checkout:\n"
                     "  nm -D --defined-only ${LIBRARY} | awk '{print $2, $3}' | LC_ALL=C sort > ${GOLDEN}\n")
  message(FATAL_ERROR "${text}")
endif()
list(LENGTH actual n)
message(STATUS "check_golden_symbols: the ${n} exported symbols equal ${GOLDEN}")
