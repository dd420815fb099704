# Sourced by the build and device scripts: cuda_home prints the CUDA toolkit to build against.
#
# torch's cpp_extension takes CUDA_HOME, else dirname(dirname(which nvcc)), else /usr/local/cuda. Its
# second guess is /usr/local where nvcc on PATH is a wrapper script in /usr/local/bin, and the build
# then finds no CUDA headers. So: CUDA_HOME when it holds a toolkit; else the toolkit the nvcc on PATH
# runs from, as nvcc itself reports it (its TOP, through links and wrappers alike); else
# /usr/local/cuda. Export the result as CUDA_HOME and torch uses the same toolkit.
nvcc_top() {
  command -v nvcc >/dev/null || return 0
  local top
  top=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  [[ -n "$top" ]] && (cd "$top" 2>/dev/null && pwd -P)
}

cuda_home() {
  local c
  for c in "${CUDA_HOME:-}" "$(nvcc_top)" /usr/local/cuda; do
    if [[ -n "$c" && -x "$c/bin/nvcc" && -f "$c/include/cuda_runtime.h" ]]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
