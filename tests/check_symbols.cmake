# Checks the dynamic symbol table and SONAME of libllmq.so. Run as a test:
#   cmake -DLIBRARY=libllmq.so -DHEADER=include/llmq.h -DNM=nm -DREADELF=readelf
#         -DEXPECTED_SONAME=libllmq.so.0 -P check_symbols.cmake
# Fails when
# - a defined dynamic symbol does not start with llmq_ (the version script capi/llmq.map must hide
#   every C++, standard library and dependency symbol); the only other entry allowed is the
#   absolute symbol that names a version node (LLMQ_0), which nm lists with type A;
# - an llmq_ symbol is not versioned @@LLMQ_<n>;
# - a function that llmq.h declares with LLMQ_API is not exported, or an llmq_ symbol is exported
#   that llmq.h does not declare (nor define as a macro: the 0.1 *_default functions);
# - the SONAME is not EXPECTED_SONAME (a change of SONAME is an ABI break for every user).
cmake_minimum_required(VERSION 3.25)

foreach(var LIBRARY HEADER NM READELF EXPECTED_SONAME)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_symbols.cmake: pass -D${var}=...")
  endif()
endforeach()
if(NOT EXISTS "${LIBRARY}")
  message(FATAL_ERROR "check_symbols.cmake: ${LIBRARY} does not exist")
endif()

execute_process(COMMAND "${NM}" -D --defined-only "${LIBRARY}"
  OUTPUT_VARIABLE nm_out ERROR_VARIABLE nm_err RESULT_VARIABLE nm_rc)
if(NOT nm_rc EQUAL 0)
  message(FATAL_ERROR "${NM} -D --defined-only ${LIBRARY} failed (${nm_rc}): ${nm_err}")
endif()

set(errors "")
set(exported "")
string(REPLACE "\n" ";" nm_lines "${nm_out}")
foreach(line IN LISTS nm_lines)
  string(STRIP "${line}" line)
  if(line STREQUAL "")
    continue()
  endif()
  # "ADDRESS TYPE NAME[@@VERSION]"
  if(NOT line MATCHES "^([0-9a-fA-F]+ +)?([A-Za-z]) +([^ ]+)$")
    string(APPEND errors "  cannot parse nm output line: '${line}'\n")
    continue()
  endif()
  set(type "${CMAKE_MATCH_2}")
  set(full "${CMAKE_MATCH_3}")
  string(REGEX REPLACE "@.*$" "" name "${full}")
  if(type STREQUAL "A" AND name MATCHES "^LLMQ_[0-9]+$")
    continue()  # the version node itself
  endif()
  if(NOT name MATCHES "^llmq_")
    string(APPEND errors "  exported symbol does not start with llmq_: ${full} (type ${type})\n")
    continue()
  endif()
  if(NOT full MATCHES "@@?LLMQ_[0-9]+$")
    string(APPEND errors "  ${full} is not versioned LLMQ_<n> (is capi/llmq.map applied?)\n")
  endif()
  list(APPEND exported "${name}")
endforeach()

# The functions llmq.h declares: "LLMQ_API <type> llmq_name(" (the type may contain '*').
file(READ "${HEADER}" header_text)
string(REGEX MATCHALL "LLMQ_API[^;(]*[ *](llmq_[A-Za-z0-9_]+)[ ]*\\(" declarations "${header_text}")
set(declared "")
foreach(declaration IN LISTS declarations)
  string(REGEX MATCH "(llmq_[A-Za-z0-9_]+)[ ]*\\($" _ "${declaration}")
  list(APPEND declared "${CMAKE_MATCH_1}")
endforeach()
list(LENGTH declared n_declared)
if(n_declared LESS 10)
  string(APPEND errors "  found only ${n_declared} LLMQ_API functions in ${HEADER}; the parser is out of date\n")
endif()
foreach(name IN LISTS declared)
  if(NOT name IN_LIST exported)
    string(APPEND errors "  ${name} is declared in llmq.h but not exported\n")
  endif()
endforeach()
# Names llmq.h defines as function-like macros (the *_default macros over *_init): the library may
# also export a function of that name, for programs built against llmq 0.1, which declared it.
string(REGEX MATCHALL "#define (llmq_[A-Za-z0-9_]+)\\(" macro_lines "${header_text}")
set(macros "")
foreach(line IN LISTS macro_lines)
  string(REGEX MATCH "(llmq_[A-Za-z0-9_]+)\\($" _ "${line}")
  list(APPEND macros "${CMAKE_MATCH_1}")
endforeach()
foreach(name IN LISTS exported)
  if(NOT name IN_LIST declared AND NOT name IN_LIST macros)
    string(APPEND errors "  ${name} is exported but not declared with LLMQ_API in llmq.h\n")
  endif()
endforeach()

execute_process(COMMAND "${READELF}" -d "${LIBRARY}"
  OUTPUT_VARIABLE readelf_out ERROR_VARIABLE readelf_err RESULT_VARIABLE readelf_rc)
if(NOT readelf_rc EQUAL 0)
  message(FATAL_ERROR "${READELF} -d ${LIBRARY} failed (${readelf_rc}): ${readelf_err}")
endif()
if(readelf_out MATCHES "\\(SONAME\\)[^\n]*\\[([^]\n]*)\\]")
  set(soname "${CMAKE_MATCH_1}")
  if(NOT soname STREQUAL EXPECTED_SONAME)
    string(APPEND errors "  SONAME is ${soname}, expected ${EXPECTED_SONAME}\n")
  endif()
else()
  string(APPEND errors "  ${LIBRARY} has no SONAME\n")
endif()

list(LENGTH exported n_exported)
if(NOT errors STREQUAL "")
  message(FATAL_ERROR "check_symbols: ${LIBRARY}:\n${errors}")
endif()
message(STATUS "check_symbols: ${n_exported} llmq_ functions exported, all declared in llmq.h; SONAME ${soname}")
