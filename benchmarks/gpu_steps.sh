# Sourced by the GPU scripts (gpu_suite.sh, gpu_compress.sh): each step has its own time limit,
# and the next runs even if one fails, so a slow step costs one result, not the whole lease.
step() {  # step SECONDS COMMAND...: run with a time limit, report its exit status, go on
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) $* (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== exit status $?"
}
