// Raw TCP over loopback, 2 streams, 1 GiB of random bytes, memory to memory, with each stream's
// receiving thread placed relative to its sending thread (README: "Raw TCP's ceiling on loopback
// is where each stream's receiver runs"). Build: cc -O2 -pthread -o raw-placement raw-placement.c
// Run: ./raw-placement MODE [CONGESTION [WRITE_BYTES]] (writes of 1 MiB by default).
// MODE 0: senders on core i, receivers free; 1: both ends of stream i on core i; 2: sender on
// core i, receiver on the other core; 3: all free.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#define TOTAL (1ul << 30)
#define N 2
static char *src, *dst;
static int mode; static size_t wsize = 1 << 20;
struct arg { int fd, i, send; double cpu; };
static double now(clockid_t c) { struct timespec t; clock_gettime(c, &t); return t.tv_sec + t.tv_nsec / 1e9; }
/* Cores 0 and 1: a 2-core host, or one whose first two cores are allowed. */
static void pin(int core) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(core, &s);
    int e = pthread_setaffinity_np(pthread_self(), sizeof s, &s);
    if (e) { fprintf(stderr, "pinning to core %d: %s\n", core, strerror(e)); exit(1); }
}
static void *run(void *p) {
    struct arg *a = p;
    if (a->send && mode != 3) pin(a->i);
    if (!a->send && mode == 1) pin(a->i);
    if (!a->send && mode == 2) pin(1 - a->i);
    size_t each = TOTAL / N, off = a->i * each, done = 0;
    double c0 = now(CLOCK_THREAD_CPUTIME_ID);
    while (done < each) {
        ssize_t r = a->send ? send(a->fd, src + off + done, (each - done) < wsize ? each - done : wsize, MSG_NOSIGNAL)
                            : recv(a->fd, dst + off + done, each - done, MSG_WAITALL);
        if (r <= 0) { perror("io"); exit(1); }
        done += r;
    }
    a->cpu = now(CLOCK_THREAD_CPUTIME_ID) - c0;
    return NULL;
}
int main(int argc, char **argv) {
    if (argc > 3 && (wsize = strtoul(argv[3], 0, 0)) == 0) {
        fprintf(stderr, "WRITE_BYTES must be a positive number\n");
        return 2;
    }
    if (argc < 2 || (mode = atoi(argv[1])) < 0 || mode > 3) {
        fprintf(stderr, "usage: %s MODE(0-3) [CONGESTION [WRITE_BYTES]]\n", argv[0]);
        return 2;
    }
    src = mmap(0, TOTAL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    dst = mmap(0, TOTAL, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    unsigned long x = 88172645463325252ul;
    for (size_t i = 0; i < TOTAL / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; ((unsigned long *)src)[i] = x; }
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (src == MAP_FAILED || dst == MAP_FAILED || l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, 8) ||
        getsockname(l, (void *)&a, &al)) { perror("setup"); return 1; }
    struct arg args[2 * N]; pthread_t t[2 * N];
    for (int i = 0; i < N; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (argc > 2 && setsockopt(c, IPPROTO_TCP, TCP_CONGESTION, argv[2], strlen(argv[2]))) { perror("TCP_CONGESTION"); return 1; }
        if (connect(c, (void *)&a, sizeof a)) { perror("connect"); return 1; }
        int s = accept(l, 0, 0);
        if (s < 0) { perror("accept"); return 1; }
        args[2 * i] = (struct arg){c, i, 1, 0}; args[2 * i + 1] = (struct arg){s, i, 0, 0};
    }
    double t0 = now(CLOCK_MONOTONIC);
    for (int i = 0; i < 2 * N; i++) pthread_create(&t[i], 0, run, &args[i]);
    for (int i = 0; i < 2 * N; i++) pthread_join(t[i], 0);
    double s = now(CLOCK_MONOTONIC) - t0;
    if (memcmp(src, dst, TOTAL)) { fprintf(stderr, "differs\n"); return 1; }
    double sc = args[0].cpu + args[2].cpu, rc = args[1].cpu + args[3].cpu;
    printf("{\"mode\": %d, \"gib_s\": %.3f, \"send_cpu\": %.3f, \"recv_cpu\": %.3f}\n", mode, 1.0 / s, sc, rc);
    return 0;
}
