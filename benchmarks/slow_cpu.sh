#!/usr/bin/env bash
# Run a command as if every core of this machine were ~2.9x slower: issue 16's 2-core machine
# without AVX-512 ran the sweep 2.9x slower than the AVX-512 one. Needs root; Linux.
#
#   sudo bash benchmarks/slow_cpu.sh [NICE] -- COMMAND...
#
# One busy loop pinned to each core at nice NICE (default -3) competes with every nice-0 thread on
# that core, so each such thread gets weight(0) / (weight(0) + weight(NICE)) of its core whether
# one or all cores are busy: nice -2 -> 2.55x, -3 -> 2.94x, -4 -> 3.44x slower (the kernel's
# sched_prio_to_weight: 1024 at nice 0, 1586, 1991, 2501 at -2, -3, -4). A CPU quota on a cgroup
# is not uniform: it slows one busy thread half as much as two. For the same reason the kernel's
# autogroups are switched off for the run (they would weigh whole sessions, not threads) and Ray's
# workers run at nice 0 (RAY_worker_niceness; Ray's default 15 would starve them against the
# loops, which no real slow machine does). What it cannot emulate: a smaller cache, and the network
# (downloads keep this machine's speed).
set -euo pipefail
NICE=-3
if [[ "${1:-}" != "--" ]]; then NICE=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || { echo "usage: $0 [NICE] -- COMMAND..." >&2; exit 2; }
AUTOGROUP=/proc/sys/kernel/sched_autogroup_enabled
old_autogroup=$(cat $AUTOGROUP 2>/dev/null || echo "")
[[ -n "$old_autogroup" ]] && echo 0 > $AUTOGROUP
loops=()
for cpu in $(seq 0 $(($(nproc) - 1))); do
  taskset -c "$cpu" nice -n "$NICE" bash -c 'while :; do :; done' &
  loops+=($!)
done
cleanup() { kill "${loops[@]}" 2>/dev/null || true; [[ -n "$old_autogroup" ]] && echo "$old_autogroup" > $AUTOGROUP; }
trap cleanup EXIT
# Start the command only once every loop has run 10 ms: a loop still starting (bash's exec can
# stall behind a large install's disk writeback) leaves its core to the command meanwhile.
for pid in "${loops[@]}"; do
  until [[ -r /proc/$pid/schedstat ]] && (( $(cut -d' ' -f1 /proc/$pid/schedstat) > 10000000 )); do
    sleep 0.01
  done
done
RAY_worker_niceness=0 "$@"
