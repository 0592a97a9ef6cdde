/*
 * What the first read into a buffer costs after the buffer was touched from
 * user space only (memset), and after the kernel wrote it once (a read of
 * /dev/zero). Under a shadow-paging hypervisor, user and kernel mode have
 * separate shadow page tables, so the kernel's first write into a page the
 * process already touched faults again; on bare metal both first reads cost
 * about the same as the second. Why the agent's prefetch buffers are faulted
 * in from both sides (src/agent/buffer-pool.ts).
 *
 *   cc -O2 -o /tmp/kernel-touch bench/tools/kernel-touch.c
 *   /tmp/kernel-touch FILE     (FILE: at least 16 MiB, in the page cache)
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SIZE (8u << 20)

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static double timed_pread(int fd, char *buf, off_t offset) {
  double start = now_ms();
  if (pread(fd, buf, SIZE, offset) != (ssize_t)SIZE) {
    perror("pread");
    exit(1);
  }
  return now_ms() - start;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FILE\n", argv[0]);
    return 2;
  }
  int fd = open(argv[1], O_RDONLY);
  int zero = open("/dev/zero", O_RDONLY);
  if (fd < 0 || zero < 0) {
    perror("open");
    return 1;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  /* Bring the file's first 16 MiB into the page cache, through a scratch buffer. */
  char *scratch = malloc(SIZE);
  timed_pread(fd, scratch, 0);
  timed_pread(fd, scratch, SIZE);

  char *user_only = malloc(SIZE);
  memset(user_only, 1, SIZE);
  double first = timed_pread(fd, user_only, 0);
  double second = timed_pread(fd, user_only, SIZE);
  printf("touched by memset only:        first 8 MiB read %6.2f ms, second %6.2f ms\n", first, second);

  char *both = malloc(SIZE);
  memset(both, 1, SIZE);
  if (read(zero, both, SIZE) != (ssize_t)SIZE) {
    perror("read /dev/zero");
    return 1;
  }
  first = timed_pread(fd, both, 0);
  second = timed_pread(fd, both, SIZE);
  printf("memset, then read /dev/zero:   first 8 MiB read %6.2f ms, second %6.2f ms\n", first, second);
  return 0;
}
