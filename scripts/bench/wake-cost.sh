#!/usr/bin/env bash
# What a thread pays right after it wakes from a sleep, on this machine
# (issue 21: the idle-RTT gap grows with the idle time). A C program sleeps
# GAP µs, then times with rdtsc, in CPU cycles (TSC):
#   first syscall   getppid(2), the first system call after the wake-up;
#   next syscalls   the five getppid calls after it (mean);
#   clock cold      clock_gettime(CLOCK_MONOTONIC) after a wake-up and one
#                   system call (the data plane reads the clock once per
#                   wake-up; boringtun-cli keeps a coarse time);
#   clock hot       the same call a million times in a row (mean).
# Prints the mean over N wake-ups (after 5 discarded), ROUNDS times.
#
#   scripts/bench/wake-cost.sh        # needs a C compiler (cc); no root
#
# Environment: ROUNDS=2, N=35, GAP=50000 (bounded: ROUNDS x (N+5) sleeps).
set -euo pipefail
ROUNDS=${ROUNDS:-2}
N=${N:-35}
GAP=${GAP:-50000}
WORK=$(mktemp -d /tmp/ztmwake.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

cat >"$WORK/wake.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <x86intrin.h>

int main(int argc, char **argv) {
    int n = atoi(argv[1]), gap = atoi(argv[2]);
    struct timespec ts;
    unsigned long first = 0, next = 0, cold = 0;
    for (int k = 0; k < n + 5; k++) {
        usleep(gap);
        unsigned long t0 = __rdtsc();
        syscall(SYS_getppid);
        unsigned long t1 = __rdtsc();
        for (int j = 0; j < 5; j++) syscall(SYS_getppid);
        unsigned long t2 = __rdtsc();
        clock_gettime(CLOCK_MONOTONIC, &ts);
        unsigned long t3 = __rdtsc();
        if (k >= 5) { first += t1 - t0; next += (t2 - t1) / 5; cold += t3 - t2; }
    }
    unsigned long h0 = __rdtsc();
    for (int i = 0; i < 1000000; i++) clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long hot = (__rdtsc() - h0) / 1000000;
    printf("first syscall %lu, next syscalls %lu, clock cold %lu, clock hot %lu cycles\n",
           first / n, next / n, cold / n, hot);
    return 0;
}
EOF
cc -O2 -o "$WORK/wake" "$WORK/wake.c"
for r in $(seq "$ROUNDS"); do
  printf 'round %d  %d wake-ups %d us apart: ' "$r" "$N" "$GAP"
  "$WORK/wake" "$N" "$GAP"
done
