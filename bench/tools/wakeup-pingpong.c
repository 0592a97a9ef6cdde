/*
 * Round trip of a 28-byte request and a 16-byte reply over a unix socket
 * pair, after the client waited GAP us in one of four ways: sleeping
 * (usleep), spinning on the clock, spinning with sched_yield, spinning with
 * poll(0). With CLIENT_CPU and SERVER_CPU, both ends are pinned first (-1:
 * not pinned). Shows what a wake-up across vCPUs costs on this host, and that
 * a client spinning for half a millisecond before sending makes it happen
 * (docs/replay.md, "Timing").
 *
 *   cc -O2 -o /tmp/wakeup-pingpong bench/tools/wakeup-pingpong.c
 *   /tmp/wakeup-pingpong [CLIENT_CPU SERVER_CPU]
 */
#define _GNU_SOURCE
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void pin(int cpu) {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof set, &set) != 0) perror("sched_setaffinity");
}

static int readn(int fd, char *buf, int n) {
  for (int got = 0; got < n;) {
    int r = read(fd, buf + got, n - got);
    if (r <= 0) return -1;
    got += r;
  }
  return 0;
}

int main(int argc, char **argv) {
  int client_cpu = argc > 2 ? atoi(argv[1]) : -1, server_cpu = argc > 2 ? atoi(argv[2]) : -1;
  int sv[2];
  char buf[64] = {0};
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return perror("socketpair"), 1;
  if (fork() == 0) {
    pin(server_cpu);
    while (readn(sv[1], buf, 28) == 0) write(sv[1], buf, 16);
    _exit(0);
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  pin(client_cpu);
  const char *modes[] = {"sleep", "spin", "sched_yield spin", "poll spin"};
  int gaps[] = {100, 500, 2000};
  for (int g = 0; g < 3; g++) {
    for (int m = 0; m < 4; m++) {
      double total = 0;
      int n = 1000;
      for (int i = 0; i < n; i++) {
        double start = now_us();
        if (m == 0) usleep(gaps[g]);
        else while (now_us() - start < gaps[g]) { if (m == 2) sched_yield(); if (m == 3) poll(NULL, 0, 0); }
        double sent = now_us();
        write(sv[0], buf, 28);
        if (readn(sv[0], buf, 16) != 0) return fprintf(stderr, "server gone\n"), 1;
        total += now_us() - sent;
      }
      printf("client cpu %d, server cpu %d, gap %5d us, %-16s: round trip %.1f us\n", client_cpu, server_cpu, gaps[g], modes[m], total / n);
    }
  }
  close(sv[0]);
  wait(NULL);
  return 0;
}
