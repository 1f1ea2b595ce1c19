# Sourced by scripts/runner_asan.sh and scripts/fuzz_native.sh: the environment in which a Python loads the native
# runner built with AddressSanitizer and UBSan (docs/operations.md "The native runner under sanitizers").
# libstdc++ preloaded beside libasan: python itself does not link it, and ASan's __cxa_throw interceptor needs it
# at startup (else the first C++ exception torch throws aborts: "real___cxa_throw != 0")
CXX=${CXX:-g++}
export LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# every Python object from malloc: a record (a bytes object of tens of bytes) otherwise lives in a pymalloc arena,
# where ASan sees no redzone and a read past its end goes unreported (checked: an 8-byte read 4 bytes before a
# record's end is reported with this and passes silently without it)
export PYTHONMALLOC=malloc
export GPUPOOL_NATIVE_RUNNER_SANITIZE=1
