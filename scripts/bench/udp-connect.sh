#!/usr/bin/env bash
# What the UDP socket alone costs a round trip, without a tunnel (issue 21):
# two namespaces on a veth (198.18.0.1/24 <-> 198.18.0.2/24), a C ping-pong
# of 128-byte datagrams (N round trips, GAP µs apart, after WARM warm-up
# ones), alternating, ROUNDS times, in three modes:
#   unconnected  sendto/recvfrom on plain sockets;
#   connected    send/recv on connected sockets (issue 21 named "connected
#                per-peer UDP sockets" as a latency lever);
#   ztmesh       unconnected, with the options the data plane sets (SO_MARK,
#                SO_RCVBUFFORCE 16 MiB / SO_SNDBUFFORCE 4 MiB, UDP_GRO,
#                IP_PKTINFO + IP_RECVTOS, IP_PMTUDISC_PROBE) and sendmsg
#                with the IP_TOS control message quinn-udp always adds.
# Prints the median, p10 and p90 round trip per mode and round.
#
#   sudo scripts/bench/udp-connect.sh        # needs a C compiler (cc)
#
# Environment: ROUNDS=3, N=3000, GAP=500, WARM=100 (bounded: every receive
# times out after 1 s). GAP=50000 WARM=3 N=150 measures cold round trips.
set -euo pipefail
[[ $EUID -eq 0 ]] || { echo "udp-connect.sh: needs root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3}
N=${N:-3000}
GAP=${GAP:-500}
WARM=${WARM:-100}
TAG="zu$$"
A="$TAG-a"
B="$TAG-b"
WORK=$(mktemp -d /tmp/ztmudp.XXXXXX)
SERVER=

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
  ip netns del "$A" 2>/dev/null
  ip netns del "$B" 2>/dev/null
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat >"$WORK/pp.c" <<'EOF'
/* pp s|c MODE N GAP WARM [PEER]: a UDP ping-pong on port 51999;
   MODE 0 unconnected, 1 connected, 2 unconnected with ztmesh's options. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* mode 2 sends with an IP_TOS control message, as quinn-udp does */
static ssize_t send_to(int s, int mode, const void *buf, size_t len, struct sockaddr_in *to) {
  if (mode != 2) return sendto(s, buf, len, 0, (void *)to, sizeof *to);
  char control[CMSG_SPACE(sizeof(int))];
  struct iovec iov = {(void *)buf, len};
  struct msghdr m = {.msg_name = to, .msg_namelen = sizeof *to, .msg_iov = &iov,
                     .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
  struct cmsghdr *h = CMSG_FIRSTHDR(&m);
  int tos = 0;
  h->cmsg_level = IPPROTO_IP;
  h->cmsg_type = IP_TOS;
  h->cmsg_len = CMSG_LEN(sizeof tos);
  memcpy(CMSG_DATA(h), &tos, sizeof tos);
  return sendmsg(s, &m, 0);
}

int main(int argc, char **argv) {
  if (argc < 6) return 2;
  int mode = atoi(argv[2]), n = atoi(argv[3]), gap = atoi(argv[4]), warm = atoi(argv[5]), one = 1;
  int connected = mode == 1;
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  struct timeval timeout = {.tv_sec = 1};
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  if (mode == 2) {
    int mark = 0x5a7e, rcv = 16 << 20, snd = 4 << 20, probe = IP_PMTUDISC_PROBE;
    setsockopt(s, SOL_SOCKET, SO_MARK, &mark, sizeof mark);
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcv, sizeof rcv);
    setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &snd, sizeof snd);
    setsockopt(s, IPPROTO_UDP, UDP_GRO, &one, sizeof one);
    setsockopt(s, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
    setsockopt(s, IPPROTO_IP, IP_RECVTOS, &one, sizeof one);
    setsockopt(s, IPPROTO_IP, IP_MTU_DISCOVER, &probe, sizeof probe);
  }
  struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(51999)};
  if (bind(s, (void *)&me, sizeof me) != 0) { perror("bind"); return 1; }
  char buf[2048];
  struct sockaddr_in peer = {.sin_family = AF_INET, .sin_port = htons(51999)};
  socklen_t len = sizeof peer;
  if (argv[1][0] == 's') {
    /* Echo until a 1-byte datagram or 10 s without one. */
    struct timeval first = {.tv_sec = 10};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &first, sizeof first);
    ssize_t got = recvfrom(s, buf, sizeof buf, 0, (void *)&peer, &len);
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    if (connected && got > 0) connect(s, (void *)&peer, len);
    while (got > 1) {
      if (connected) send(s, buf, got, 0);
      else send_to(s, mode, buf, got, &peer);
      got = connected ? recv(s, buf, sizeof buf, 0)
                      : recvfrom(s, buf, sizeof buf, 0, (void *)&peer, &len);
    }
    return 0;
  }
  if (argc < 7 || inet_pton(AF_INET, argv[6], &peer.sin_addr) != 1) return 2;
  if (connected) connect(s, (void *)&peer, sizeof peer);
  double *rtt = malloc(n * sizeof(double));
  int lost = 0, m = 0;
  memset(buf, 7, 128);
  for (int i = 0; i < n + warm; i++) {
    usleep(gap);
    double t0 = now_us();
    if (connected) send(s, buf, 128, 0);
    else send_to(s, mode, buf, 128, &peer);
    ssize_t got = connected ? recv(s, buf, sizeof buf, 0)
                            : recvfrom(s, buf, sizeof buf, 0, NULL, NULL);
    if (i < warm) continue;
    if (got <= 0) lost++;
    else rtt[m++] = now_us() - t0;
  }
  if (connected) send(s, "x", 1, 0);
  else sendto(s, "x", 1, 0, (void *)&peer, sizeof peer);
  if (m <= 0) { printf("no replies\n"); return 1; }
  qsort(rtt, m, sizeof(double), cmp);
  printf("%-11s median %6.2f us  p10 %6.2f  p90 %6.2f  (%d round trips, %d lost)\n",
         mode == 1 ? "connected" : mode == 2 ? "ztmesh" : "unconnected", rtt[m / 2], rtt[m / 10], rtt[9 * m / 10], m, lost);
  return 0;
}
EOF
cc -O2 -o "$WORK/pp" "$WORK/pp.c"

ip netns add "$A"
ip netns add "$B"
ip -n "$A" link add veth0 type veth peer name veth0 netns "$B"
ip -n "$A" addr add 198.18.0.1/24 dev veth0
ip -n "$B" addr add 198.18.0.2/24 dev veth0
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; ip -n "$ns" link set veth0 up; done

for round in $(seq "$ROUNDS"); do
  for mode in 0 1 2; do
    ip netns exec "$B" "$WORK/pp" s "$mode" "$N" "$GAP" "$WARM" &
    SERVER=$!
    sleep 0.2
    printf 'round %s  ' "$round"
    ip netns exec "$A" timeout $(((N + WARM) * (GAP + 1000) / 1000000 + 30)) "$WORK/pp" c "$mode" "$N" "$GAP" "$WARM" 198.18.0.2
    wait "$SERVER" 2>/dev/null || true
    SERVER=
  done
done
