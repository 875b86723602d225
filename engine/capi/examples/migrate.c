/* Migrates two mmap'ed regions with libpagewire over loopback: three rounds driven by dirty
 * bitmaps (everything, then pages rewritten in between), a device state blob, and a check of
 * the destination with memcmp; then once more over TCP connections made here and handed in as
 * file descriptors. Built and run by engine/capi/tests/c_example.rs:
 *
 *   cc migrate.c $(pkg-config --cflags --libs pagewire) -lpthread -o migrate && ./migrate [TLS_DIR]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pagewire.h"

#define PAGE 4096u
#define LOW_PAGES 2048u   /* 8 MiB at guest-physical 0 */
#define HIGH_PAGES 1024u  /* 4 MiB at 4 GiB */
#define BLOB_TAG 0x75706376u /* "vcpu" */

static void *map(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static int check(pw_status status, const char *what) {
    if (status != PW_STATUS_OK) {
        fprintf(stderr, "%s failed (status %d): %s\n", what, (int)status, pw_last_error());
        return 0;
    }
    return 1;
}

static void set_bit(uint64_t *bitmap, uint64_t page) { bitmap[page / 64] |= 1ull << (page % 64); }

/* Writes `count` pages of `region` from `first` with a pattern of `round` and marks them. */
static void dirty(uint8_t *region, uint64_t *bitmap, uint64_t first, uint64_t count, int round) {
    for (uint64_t p = first; p < first + count; p++) {
        memset(region + p * PAGE, 0x40 + round, PAGE);
        memcpy(region + p * PAGE, &p, sizeof p);
        set_bit(bitmap, p);
    }
}

static void *receive(void *arg) {
    pw_status *status = malloc(sizeof *status);
    *status = pw_receiver_run((pw_receiver *)arg);
    return status;
}

/* Two connected pairs made here as management software would, then handed to libpagewire as
 * file descriptors: loopback TCP connections, or (`unix`) UNIX socketpairs, as a VMM passes
 * them. Copies `low` (LOW_PAGES pages) once more, into `copy`. */
static int migrate_over_fds(uint8_t *low, const pw_options *options, int unix) {
    int client_fds[2], server_fds[2];
    if (unix) {
        for (int i = 0; i < 2; i++) {
            int pair[2];
            if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair)) {
                perror("socketpair");
                return 0;
            }
            client_fds[i] = pair[0];
            server_fds[i] = pair[1];
        }
    } else {
        int listener = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof addr;
        if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 4) ||
            getsockname(listener, (struct sockaddr *)&addr, &len)) {
            perror("listen");
            return 0;
        }
        for (int i = 0; i < 2; i++) {
            client_fds[i] = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(client_fds[i], (struct sockaddr *)&addr, sizeof addr)) {
                perror("connect");
                return 0;
            }
            server_fds[i] = accept(listener, NULL, NULL);
        }
        close(listener);
    }
    uint8_t *copy = map(LOW_PAGES * PAGE);
    pw_region src_region = {0, LOW_PAGES * PAGE, low}, dst_region = {0, LOW_PAGES * PAGE, copy};
    pw_memory *src = NULL, *dst = NULL;
    pw_receiver *receiver = NULL;
    pw_sender *sender = NULL;
    if (!check(pw_memory_new(&src_region, 1, &src), "pw_memory_new") ||
        !check(pw_memory_new(&dst_region, 1, &dst), "pw_memory_new") ||
        !check(pw_receiver_over_fds(server_fds, 2, dst, options, &receiver), "pw_receiver_over_fds"))
        return 0;
    pthread_t thread;
    pthread_create(&thread, NULL, receive, receiver);
    uint64_t all[LOW_PAGES / 64];
    memset(all, 0xff, sizeof all);
    const uint64_t *bitmaps[1] = {all};
    const size_t words[1] = {LOW_PAGES / 64};
    if (!check(pw_sender_over_fds(client_fds, 2, src, options, &sender), "pw_sender_over_fds") ||
        !check(pw_sender_send_bitmaps(sender, bitmaps, words, 1, false), "pw_sender_send_bitmaps") ||
        !check(pw_sender_finish(sender), "pw_sender_finish"))
        return 0;
    pw_status *received;
    pthread_join(thread, (void **)&received);
    int ok = check(*received, "pw_receiver_run") && memcmp(low, copy, LOW_PAGES * PAGE) == 0;
    free(received);
    pw_sender_free(sender);
    pw_receiver_free(receiver);
    pw_memory_free(src);
    pw_memory_free(dst);
    return ok;
}

int main(int argc, char **argv) {
    /* PAGEWIRE_CORES: the cores pagewire's shards may use, e.g. "0-3" (a VMM leaves out its vCPUs').
     * PAGEWIRE_CONGESTION: the sender's TCP congestion control, e.g. "cubic" (default: the host's).
     * PAGEWIRE_UNCHECKED_PAGES: "1" sends plaintext pages without checksums and accepts them;
     * "sender" only sends them so, which the receiver refuses.
     * PAGEWIRE_PSK_FILE: a pre-shared key file (QEMU's keys.psk) both sides use;
     * PAGEWIRE_SENDER_PSK_FILE: another one for the sender alone (which the receiver refuses).
     * PAGEWIRE_COMPRESS: the sender's compression, "none", "zstd", "zlib" or "auto". */
    const char *unchecked = getenv("PAGEWIRE_UNCHECKED_PAGES");
    pw_options options = {.channels = 2,
                          .tls_dir = argc > 1 ? argv[1] : NULL,
                          .idle_timeout_ms = 0,
                          .cores = getenv("PAGEWIRE_CORES"),
                          .congestion = getenv("PAGEWIRE_CONGESTION"),
                          .unchecked_pages = unchecked != NULL && strcmp(unchecked, "sender") != 0,
                          .psk_file = getenv("PAGEWIRE_PSK_FILE"),
                          .compress = getenv("PAGEWIRE_COMPRESS"),
                          /* the receiver's certificate names "localhost" (a sender over
                           * handed-in connections has no address to take the name from) */
                          .tls_hostname = "localhost"};
    pw_options send_options = options;
    send_options.unchecked_pages = unchecked != NULL;
    if (getenv("PAGEWIRE_SENDER_PSK_FILE"))
        send_options.psk_file = getenv("PAGEWIRE_SENDER_PSK_FILE");
    uint8_t *src_low = map(LOW_PAGES * PAGE), *src_high = map(HIGH_PAGES * PAGE);
    uint8_t *dst_low = map(LOW_PAGES * PAGE), *dst_high = map(HIGH_PAGES * PAGE);
    pw_region src_regions[2] = {{0, LOW_PAGES * PAGE, src_low}, {4ull << 30, HIGH_PAGES * PAGE, src_high}};
    pw_region dst_regions[2] = {{0, LOW_PAGES * PAGE, dst_low}, {4ull << 30, HIGH_PAGES * PAGE, dst_high}};
    pw_memory *src = NULL, *dst = NULL;
    pw_receiver *receiver = NULL;
    pw_sender *sender = NULL;
    if (!check(pw_memory_new(src_regions, 2, &src), "pw_memory_new (source)") ||
        !check(pw_memory_new(dst_regions, 2, &dst), "pw_memory_new (destination)") ||
        !check(pw_receiver_bind("127.0.0.1:0", dst, &options, &receiver), "pw_receiver_bind"))
        return 1;
    uint16_t port = 0;
    if (!check(pw_receiver_port(receiver, &port), "pw_receiver_port"))
        return 1;
    pthread_t thread;
    pthread_create(&thread, NULL, receive, receiver);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    if (!check(pw_sender_connect(addr, src, &send_options, &sender), "pw_sender_connect"))
        return 1;

    uint64_t low_bits[LOW_PAGES / 64], high_bits[HIGH_PAGES / 64];
    const uint64_t *bitmaps[2] = {low_bits, high_bits};
    const size_t words[2] = {LOW_PAGES / 64, HIGH_PAGES / 64};
    for (int round = 0; round < 3; round++) {
        memset(low_bits, 0, sizeof low_bits);
        memset(high_bits, 0, sizeof high_bits);
        if (round == 0) {
            /* Everything: half the pages written, the rest left zero (a header entry each). */
            dirty(src_low, low_bits, 0, LOW_PAGES / 2, round);
            dirty(src_high, high_bits, 0, HIGH_PAGES / 2, round);
            memset(low_bits, 0xff, sizeof low_bits);
            memset(high_bits, 0xff, sizeof high_bits);
        } else {
            /* What the guest rewrote since the last round. */
            dirty(src_low, low_bits, 100 * round, 300, round);
            dirty(src_high, high_bits, HIGH_PAGES - 64 * round, 10, round);
        }
        /* Rounds 0 and 1 are live: the "guest" (this loop) writes pages again afterwards, while
         * zero-copy sends may still read them. Round 2 is the last, sent as if paused: stable. */
        int live = round < 2;
        if (!check(pw_sender_send_bitmaps(sender, bitmaps, words, 2, live), "pw_sender_send_bitmaps"))
            return 1;
    }
    const char state[] = "rip=0x1000 rflags=0x2 (a vCPU's registers, say)";
    pw_stats sent, got;
    /* Statistics come once the transfer is over; before, the call says so. */
    if (pw_sender_stats(sender, &sent) != PW_STATUS_INVALID) {
        fprintf(stderr, "statistics before the end were not refused\n");
        return 1;
    }
    if (!check(pw_sender_send_device_state(sender, BLOB_TAG, (const uint8_t *)state, sizeof state),
               "pw_sender_send_device_state") ||
        !check(pw_sender_finish(sender), "pw_sender_finish"))
        return 1;
    pw_status *received;
    pthread_join(thread, (void **)&received);
    if (!check(*received, "pw_receiver_run"))
        return 1;
    free(received);
    if (!check(pw_sender_stats(sender, &sent), "pw_sender_stats") ||
        !check(pw_receiver_stats(receiver, &got), "pw_receiver_stats"))
        return 1;
    /* Round 0 names every page; both sides count the same pages, and say whether they were
     * checked. */
    if (sent.rounds != 3 || sent.normal_pages + sent.zero_pages < LOW_PAGES + HIGH_PAGES ||
        got.normal_pages != sent.normal_pages || got.zero_pages != sent.zero_pages ||
        sent.transferred_bytes == 0 || sent.unchecked_pages != (unchecked != NULL) ||
        got.unchecked_pages != sent.unchecked_pages) {
        fprintf(stderr,
                "statistics disagree: sent %u rounds, %llu + %llu pages, %llu bytes, unchecked %u; "
                "received %llu + %llu pages, unchecked %u\n",
                sent.rounds, (unsigned long long)sent.normal_pages,
                (unsigned long long)sent.zero_pages, (unsigned long long)sent.transferred_bytes,
                sent.unchecked_pages, (unsigned long long)got.normal_pages,
                (unsigned long long)got.zero_pages, got.unchecked_pages);
        return 1;
    }

    if (memcmp(src_low, dst_low, LOW_PAGES * PAGE) || memcmp(src_high, dst_high, HIGH_PAGES * PAGE)) {
        fprintf(stderr, "the destination differs from the source\n");
        return 1;
    }
    uint32_t tag = 0;
    const uint8_t *bytes = NULL;
    size_t len = 0;
    if (pw_receiver_blob_count(receiver) != 1 ||
        !check(pw_receiver_blob(receiver, 0, &tag, &bytes, &len), "pw_receiver_blob") ||
        tag != BLOB_TAG || len != sizeof state || memcmp(bytes, state, len)) {
        fprintf(stderr, "the device state blob did not arrive intact\n");
        return 1;
    }
    /* Errors say what happened: a second finish is refused. */
    if (pw_sender_finish(sender) != PW_STATUS_INVALID ||
        !strstr(pw_last_error(), "already finished")) {
        fprintf(stderr, "a second finish was not refused with a message\n");
        return 1;
    }
    pw_sender_free(sender);
    pw_receiver_free(receiver);
    pw_memory_free(src);
    pw_memory_free(dst);
    if (!migrate_over_fds(src_low, &options, 0)) {
        fprintf(stderr, "the migration over handed-in TCP descriptors failed\n");
        return 1;
    }
    if (!migrate_over_fds(src_low, &options, 1)) {
        fprintf(stderr, "the migration over handed-in UNIX socketpairs failed\n");
        return 1;
    }
    printf("verified: %u + %u pages in 3 rounds (%llu sent with their contents, %llu as zero pages, "
           "%llu bytes on the wire) and a %zu-byte blob, then again over handed-in TCP and UNIX "
           "descriptors (libpagewire %s)\n",
           LOW_PAGES, HIGH_PAGES, (unsigned long long)sent.normal_pages,
           (unsigned long long)sent.zero_pages, (unsigned long long)sent.transferred_bytes, len,
           pw_version());
    return 0;
}
