/* Live-migrates two mmap'ed regions with libpagewire over loopback while a "vCPU" thread keeps
 * writing them. pagewire runs the pre-copy (pw_sender_migrate) and calls back into this VMM for
 * the pages written since the last round (a dirty bitmap the writer marks, swapped out word by
 * word), to pause the writer once the rest fits the downtime limit, and for the device state (the
 * writer's counter). A management thread meanwhile reads query-migrate figures through a
 * pw_control on each side (pw_control_migration, pw_control_receiver). The destination is checked with memcmp, the blobs byte for byte.
 *
 * With the argument "cancel": the sender starts under a low bandwidth limit (pw_options), which the
 * management thread raises mid-migration through the control (the rate must follow), then it
 * cancels; both sides must return within a second, the sender with PW_STATUS_CANCELLED.
 *
 * With the argument "cancel-connect": the sender connects to a listener that never answers, with
 * a control made beforehand (pw_control_new) in its options, which another thread cancels; the
 * connect must return PW_STATUS_CANCELLED within a second, and the control serves no second one.
 * (In "cancel", too, the sender's control is made beforehand, and then drives the running sender.)
 *
 * With the argument "throttle": the writer always outruns the sender's bandwidth limit, so
 * auto-converge throttles it through the pw_vmm callback until the policy gives up at its round
 * cap, with PW_STATUS_NOT_CONVERGING and the guest still running.
 *
 * Built and run by engine/capi/tests/c_example.rs:
 *
 *   cc live.c $(pkg-config --cflags --libs pagewire) -lpthread -o live && ./live [cancel|cancel-connect|throttle] [TLS_DIR]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "pagewire.h"

#define PAGE 4096u
#define LOW_PAGES 4096u   /* 16 MiB at guest-physical 0 */
#define HIGH_PAGES 2048u  /* 8 MiB at 4 GiB, its upper half left zero */
#define WORKING_LOW 1024u /* the pages the writer keeps writing, per region */
#define WORKING_HIGH 256u
#define VCPU_TAG 0x75706376u /* "vcpu" */
#define DEV_TAG 0x30766564u  /* "dev0" */

/* The source VMM: guest memory, the dirty bitmap its "vCPU" marks, and the vCPU thread. */
struct vmm {
    uint8_t *mem[2];
    uint64_t *dirty[2];
    pthread_t vcpu;
    int stop;           /* set by pause, read by the vCPU (atomics) */
    uint64_t counter;   /* pages the vCPU wrote; its "registers" */
    int paused;
    int throttle;       /* percent of the vCPU's time taken away (atomics) */
    int throttle_calls;
    int throttle_max;
    pw_control *control; /* what the migration reports, read at each collection */
    int saw_active;
    uint32_t rounds_seen;
    pw_control *receiver_control; /* what the destination reports, read there too */
    int receiver_saw_active;
    uint32_t receiver_rounds_seen;
};

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

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void sleep_ms(double ms) {
    struct timespec t = {(time_t)(ms / 1e3), (long)((ms - (time_t)(ms / 1e3) * 1e3) * 1e6)};
    nanosleep(&t, NULL);
}

/* The "vCPU": writes its counter into pages of the working sets, 32 pages every 200 µs (about
 * 640 MB/s), marking each page dirty after writing it, until paused. */
static void *vcpu(void *arg) {
    struct vmm *v = arg;
    uint64_t x = 88172645463325252ull;
    while (!__atomic_load_n(&v->stop, __ATOMIC_ACQUIRE)) {
        for (int i = 0; i < 32; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            int r = (x >> 40) % 5 == 0; /* a fifth of the writes go to the high region */
            uint64_t page = (x >> 8) % (r ? WORKING_HIGH : WORKING_LOW);
            uint64_t n = ++v->counter;
            memcpy(v->mem[r] + page * PAGE + (n % (PAGE / 8)) * 8, &n, 8);
            __atomic_fetch_or(&v->dirty[r][page / 64], 1ull << (page % 64), __ATOMIC_RELEASE);
        }
        /* Throttled by p%, it runs (100 - p)% as often. */
        sleep_ms(0.2 * 100.0 / (100 - __atomic_load_n(&v->throttle, __ATOMIC_RELAXED)));
    }
    return NULL;
}

/* pw_vmm callbacks. */
static int32_t collect_dirty(void *ctx, uint32_t region, uint64_t *bitmap, size_t words) {
    struct vmm *v = ctx;
    size_t have = (region == 0 ? LOW_PAGES : HIGH_PAGES) / 64;
    if (region > 1 || words < have)
        return -1;
    for (size_t i = 0; i < have; i++)
        bitmap[i] |= __atomic_exchange_n(&v->dirty[region][i], 0, __ATOMIC_ACQ_REL);
    /* A collection after a round: the migration is active and reports that round. */
    pw_migration_info info;
    if (v->control && pw_control_migration(v->control, &info) == PW_STATUS_OK &&
        info.status == PW_MIGRATION_STATUS_ACTIVE) {
        v->saw_active = 1;
        if (info.rounds > v->rounds_seen)
            v->rounds_seen = info.rounds;
    }
    pw_receiver_info got;
    if (v->receiver_control && pw_control_receiver(v->receiver_control, &got) == PW_STATUS_OK &&
        got.status == PW_MIGRATION_STATUS_ACTIVE) {
        v->receiver_saw_active = 1;
        if (got.rounds > v->receiver_rounds_seen)
            v->receiver_rounds_seen = got.rounds;
    }
    return 0;
}

static int32_t pause_vcpu(void *ctx) {
    struct vmm *v = ctx;
    __atomic_store_n(&v->stop, 1, __ATOMIC_RELEASE);
    v->paused = 1;
    return pthread_join(v->vcpu, NULL); /* nothing writes once it returns */
}

static int32_t device_state(void *ctx, pw_device_state *state) {
    struct vmm *v = ctx;
    const char dev[] = "a device model's state";
    if (pw_device_state_add(state, VCPU_TAG, (const uint8_t *)&v->counter, sizeof v->counter) ||
        pw_device_state_add(state, DEV_TAG, (const uint8_t *)dev, sizeof dev))
        return -1;
    return 0;
}

static int32_t throttle(void *ctx, uint8_t percent) {
    struct vmm *v = ctx;
    if (percent > 99)
        return -1;
    __atomic_store_n(&v->throttle, percent, __ATOMIC_RELAXED);
    v->throttle_calls++;
    if (percent > v->throttle_max)
        v->throttle_max = percent;
    return 0;
}

static int64_t guest_cpu_ns(void *ctx) {
    struct vmm *v = ctx;
    clockid_t clock;
    struct timespec t;
    if (v->paused || pthread_getcpuclockid(v->vcpu, &clock) || clock_gettime(clock, &t))
        return -1;
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* The destination. */
struct receiving {
    pw_receiver *receiver;
    pw_status status;
    double returned_ms;
};

static void *receive(void *arg) {
    struct receiving *r = arg;
    r->status = pw_receiver_run(r->receiver);
    r->returned_ms = now_ms();
    return NULL;
}

/* The management thread, with `cancel`: once the migration is active, measures the rate
 * under the low limit, raises the limit and measures again, then cancels. */
struct watch {
    pw_control *control;
    double rate_low, rate_high; /* wire bytes per second at the low and the raised limit */
    double cancelled_ms;
    int done; /* atomics */
};

#define LIMIT_LOW (4u << 20)   /* bytes per second */
#define LIMIT_HIGH (16u << 20)
#define LIMIT_THROTTLE (32u << 20)

static uint64_t wire_bytes(pw_control *c) {
    pw_progress p = {0};
    pw_control_progress(c, &p);
    return p.transferred_bytes;
}

static double rate_over(pw_control *c, double ms) {
    uint64_t before = wire_bytes(c);
    sleep_ms(ms);
    return (wire_bytes(c) - before) / (ms / 1e3);
}

static void *watch(void *arg) {
    struct watch *w = arg;
    double deadline = now_ms() + 10000;
    while (!__atomic_load_n(&w->done, __ATOMIC_ACQUIRE) && now_ms() < deadline) {
        pw_migration_info info;
        if (pw_control_migration(w->control, &info) == PW_STATUS_OK) {
            if (info.status == PW_MIGRATION_STATUS_ACTIVE) {
                sleep_ms(200); /* past the first chain of sends */
                w->rate_low = rate_over(w->control, 600);
                check(pw_control_set_max_bandwidth(w->control, LIMIT_HIGH), "set_max_bandwidth");
                sleep_ms(100);
                w->rate_high = rate_over(w->control, 600);
                w->cancelled_ms = now_ms();
                check(pw_control_cancel(w->control), "pw_control_cancel");
                return NULL;
            }
        }
        sleep_ms(1);
    }
    return NULL;
}

/* `cancel-connect`: a listener that takes connections into its backlog but never accepts them,
 * so the sender's handshake waits for an answer that never comes (up to 10 s), until another
 * thread cancels through the control made beforehand. */
struct canceller {
    pw_control *control;
    int listener;
    double cancelled_ms; /* 0 unless the sender's connection was seen queued, then cancelled */
};

static void *cancel_later(void *arg) {
    struct canceller *c = arg;
    /* The sender's connection is queued (the listener turns readable), so the connect has
     * started; cancel once its handshake has waited a while. */
    struct pollfd queued = {.fd = c->listener, .events = POLLIN};
    if (poll(&queued, 1, 5000) == 1) {
        sleep_ms(200);
        c->cancelled_ms = now_ms();
    }
    check(pw_control_cancel(c->control), "pw_control_cancel");
    return NULL;
}

static int cancel_connect(pw_memory *src) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof at;
    if (listener < 0 || bind(listener, (struct sockaddr *)&at, sizeof at) || listen(listener, 16) ||
        getsockname(listener, (struct sockaddr *)&at, &len)) {
        perror("listener");
        return 1;
    }
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", ntohs(at.sin_port));
    pw_control *control = NULL;
    if (!check(pw_control_new(&control), "pw_control_new"))
        return 1;
    /* Not connected yet: no progress, and no limit or migration to act on. */
    pw_progress progress = {1, 1, 1};
    pw_migration_info info;
    if (!check(pw_control_progress(control, &progress), "pw_control_progress") ||
        progress.pages_done || progress.pages_total || progress.transferred_bytes ||
        pw_control_set_max_bandwidth(control, 1) != PW_STATUS_INVALID ||
        pw_control_migration(control, &info) != PW_STATUS_INVALID) {
        fprintf(stderr, "a control not connected yet answered what it cannot know\n");
        return 1;
    }
    pw_options options = {.channels = 2, .control = control};
    pw_receiver *receiver = NULL;
    if (pw_receiver_bind("127.0.0.1:0", src, &options, &receiver) != PW_STATUS_INVALID) {
        fprintf(stderr, "a receiver took a sender's control\n");
        return 1;
    }
    pthread_t cancelling;
    struct canceller c = {.control = control, .listener = listener};
    if (pthread_create(&cancelling, NULL, cancel_later, &c)) {
        perror("pthread_create");
        return 1;
    }
    pw_sender *sender = NULL;
    pw_status connected = pw_sender_connect(addr, src, &options, &sender);
    double returned_ms = now_ms();
    pthread_join(cancelling, NULL);
    double after_s = (returned_ms - c.cancelled_ms) / 1e3;
    printf("cancel-connect: the connect returned %d (%s) %.3f s after the cancel\n",
           (int)connected, pw_last_error(), after_s);
    if (connected != PW_STATUS_CANCELLED || c.cancelled_ms == 0 || after_s > 1.0 || sender != NULL)
        return 1;
    /* The control served its one connect. */
    pw_status again = pw_sender_connect(addr, src, &options, &sender);
    if (again != PW_STATUS_INVALID || strstr(pw_last_error(), "pw_control_new") == NULL) {
        fprintf(stderr, "a second connect with the control returned %d: %s\n", (int)again,
                pw_last_error());
        return 1;
    }
    pw_control_free(control);
    close(listener);
    return 0;
}

int main(int argc, char **argv) {
    int cancel = argc > 1 && strcmp(argv[1], "cancel") == 0;
    int throttled = argc > 1 && strcmp(argv[1], "throttle") == 0;
    int cancel_conn = argc > 1 && strcmp(argv[1], "cancel-connect") == 0;
    int mode = cancel + throttled + cancel_conn;
    const char *tls_dir = argc > 1 + mode ? argv[1 + mode] : NULL;
    /* With `cancel`, the sender starts under the low bandwidth limit; with `throttle`, under
     * one the writer always outruns. */
    /* The certificates name the receiver "localhost"; without tls_hostname the sender would
     * check the host of the address it connects to (127.0.0.1). */
    pw_options options = {.channels = 2,
                          .tls_dir = tls_dir,
                          .max_bandwidth_bytes_per_s = cancel ? LIMIT_LOW : throttled ? LIMIT_THROTTLE : 0,
                          .tls_hostname = "localhost"};
    struct vmm v = {.mem = {map(LOW_PAGES * PAGE), map(HIGH_PAGES * PAGE)},
                    .dirty = {calloc(LOW_PAGES / 64, 8), calloc(HIGH_PAGES / 64, 8)}};
    for (uint64_t p = 0; p < LOW_PAGES; p++)
        memset(v.mem[0] + p * PAGE, (int)(p * 7 + 1), PAGE);
    for (uint64_t p = 0; p < HIGH_PAGES / 2; p++)
        memset(v.mem[1] + p * PAGE, (int)(p * 5 + 3), PAGE);
    uint8_t *dst_low = map(LOW_PAGES * PAGE), *dst_high = map(HIGH_PAGES * PAGE);
    pw_region src_regions[2] = {{0, LOW_PAGES * PAGE, v.mem[0]}, {4ull << 30, HIGH_PAGES * PAGE, v.mem[1]}};
    pw_region dst_regions[2] = {{0, LOW_PAGES * PAGE, dst_low}, {4ull << 30, HIGH_PAGES * PAGE, dst_high}};
    pw_memory *src = NULL, *dst = NULL;
    struct receiving r = {0};
    pw_sender *sender = NULL;
    pw_control *control = NULL, *receiver_control = NULL;
    uint16_t port = 0;
    if (cancel_conn)
        return check(pw_memory_new(src_regions, 2, &src), "pw_memory_new (source)") ? cancel_connect(src) : 1;
    if (!check(pw_memory_new(src_regions, 2, &src), "pw_memory_new (source)") ||
        !check(pw_memory_new(dst_regions, 2, &dst), "pw_memory_new (destination)") ||
        !check(pw_receiver_bind("127.0.0.1:0", dst, &options, &r.receiver), "pw_receiver_bind") ||
        !check(pw_receiver_port(r.receiver, &port), "pw_receiver_port") ||
        !check(pw_receiver_control(r.receiver, &receiver_control), "pw_receiver_control"))
        return 1;
    pthread_t receiving;
    pthread_create(&receiving, NULL, receive, &r);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    /* With `cancel`, the sender's control is made before it connects (and could cancel the
     * connect); otherwise it is taken from the connected sender. Either controls it alike. */
    pw_options sender_options = options;
    if (cancel && !check(pw_control_new(&control), "pw_control_new"))
        return 1;
    sender_options.control = control;
    if (!check(pw_sender_connect(addr, src, &sender_options, &sender), "pw_sender_connect") ||
        (!cancel && !check(pw_sender_control(sender, &control), "pw_sender_control")))
        return 1;
    /* A control serves one sender: a second connect with it is refused before it connects. */
    pw_sender *second = NULL;
    sender_options.control = control;
    if (pw_sender_connect(addr, src, &sender_options, &second) != PW_STATUS_INVALID ||
        strstr(pw_last_error(), "belongs to a connected sender") == NULL) {
        fprintf(stderr, "a second sender took a control: %s\n", pw_last_error());
        return 1;
    }
    pw_migration_info info;
    /* Before the migration starts there is nothing to report, and a receiver has no limit. */
    if (pw_control_migration(control, &info) != PW_STATUS_INVALID ||
        pw_control_set_max_bandwidth(receiver_control, 1) != PW_STATUS_INVALID) {
        fprintf(stderr, "a control answered what it cannot know\n");
        return 1;
    }

    v.control = control;
    v.receiver_control = receiver_control;
    pthread_create(&v.vcpu, NULL, vcpu, &v);
    sleep_ms(20); /* the guest runs before the migration starts */
    struct watch w = {.control = control};
    pthread_t watching;
    if (cancel)
        pthread_create(&watching, NULL, watch, &w);
    pw_vmm callbacks = {.ctx = &v,
                        .collect_dirty = collect_dirty,
                        .pause = pause_vcpu,
                        .device_state = device_state,
                        .guest_cpu_ns = guest_cpu_ns,
                        .throttle = throttle};
    pw_policy policy = {.downtime_limit_ms = 300, .auto_converge = 1};
    if (throttled) /* 5 MiB of working set at 32 MiB/s never fits 20 ms: throttle, then give up */
        policy = (pw_policy){.downtime_limit_ms = 20, .rounds_max = 6, .auto_converge = 1};
    pw_status migrated = pw_sender_migrate(sender, &callbacks, &policy, &info);
    double returned_ms = now_ms();
    if (migrated != PW_STATUS_OK && migrated != PW_STATUS_CANCELLED && !throttled)
        fprintf(stderr, "pw_sender_migrate: %s\n", pw_last_error());
    int paused_by_migration = v.paused;
    __atomic_store_n(&w.done, 1, __ATOMIC_RELEASE);
    if (cancel)
        pthread_join(watching, NULL);
    pthread_join(receiving, NULL);
    if (!v.paused) {
        __atomic_store_n(&v.stop, 1, __ATOMIC_RELEASE);
        pthread_join(v.vcpu, NULL);
    }
    /* The destination's own view once its run returned. */
    pw_receiver_info dest;
    if (!check(pw_control_receiver(receiver_control, &dest), "pw_control_receiver"))
        return 1;

    if (throttled) {
        /* Auto-converge throttled the writer through the callback and the migration reports
         * it; a policy that gave up left the guest running, not paused, and unthrottled. */
        printf("throttle: %d call(s), the guest throttled up to %d%% and now at %d%% when the "
               "policy gave up after %u rounds (status %d: %s)\n",
               v.throttle_calls, v.throttle_max, v.throttle, info.rounds, (int)migrated,
               pw_last_error());
        return migrated == PW_STATUS_NOT_CONVERGING && info.status == PW_MIGRATION_STATUS_FAILED &&
                       v.throttle_calls >= 2 && v.throttle_max >= 20 && v.throttle == 0 &&
                       info.cpu_throttle_percentage == v.throttle_max && !paused_by_migration &&
                       r.status != PW_STATUS_OK && dest.status == PW_MIGRATION_STATUS_FAILED
                   ? 0
                   : 1;
    }
    if (cancel) {
        /* The rate followed the limit, and both sides stopped within a second of the cancel. */
        double sender_s = (returned_ms - w.cancelled_ms) / 1e3;
        double receiver_s = (r.returned_ms - w.cancelled_ms) / 1e3;
        printf("cancel: rate %.1f MiB/s at a %u MiB/s limit, %.1f MiB/s at %u; sender returned %d "
               "after %.3f s (status %s), receiver %d after %.3f s\n",
               w.rate_low / 1048576, LIMIT_LOW >> 20, w.rate_high / 1048576, LIMIT_HIGH >> 20,
               (int)migrated, sender_s,
               info.status == PW_MIGRATION_STATUS_CANCELLED ? "cancelled" : "not cancelled",
               (int)r.status, receiver_s);
        int ok = w.cancelled_ms > 0 && migrated == PW_STATUS_CANCELLED &&
                 info.status == PW_MIGRATION_STATUS_CANCELLED && r.status != PW_STATUS_OK &&
                 dest.status == PW_MIGRATION_STATUS_FAILED && /* cancelled at the source */
                 sender_s < 1.0 && receiver_s < 1.0 && w.rate_low > 0 &&
                 w.rate_low < 2.0 * LIMIT_LOW && w.rate_high > 1.5 * w.rate_low;
        return ok ? 0 : 1;
    }

    if (migrated != PW_STATUS_OK || !check(r.status, "pw_receiver_run"))
        return 1;
    pw_stats sent, got;
    pw_progress placed;
    if (!check(pw_sender_stats(sender, &sent), "pw_sender_stats") ||
        !check(pw_receiver_stats(r.receiver, &got), "pw_receiver_stats") ||
        !check(pw_control_progress(receiver_control, &placed), "pw_control_progress"))
        return 1;
    /* Round 0, at least one round of dirty pages, then the paused one; the control reported
     * the migration active while it ran, and the figures agree with the statistics. */
    if (info.status != PW_MIGRATION_STATUS_COMPLETED || !info.converged || info.rounds < 3 ||
        info.downtime_ms < 0 || info.downtime_ms > 300 || !v.saw_active || v.rounds_seen < 1 ||
        sent.rounds != info.rounds || got.normal_pages != sent.normal_pages ||
        placed.pages_done != got.normal_pages + got.zero_pages ||
        info.dirty_sync_count < info.rounds) {
        fprintf(stderr,
                "figures disagree: status %d, converged %u, %u rounds (stats %u), downtime %.1f ms, "
                "the control said active %d after %u rounds, pages %llu/%llu, placed %llu, syncs %u\n",
                (int)info.status, info.converged, info.rounds, sent.rounds, info.downtime_ms,
                v.saw_active, v.rounds_seen, (unsigned long long)sent.normal_pages,
                (unsigned long long)got.normal_pages, (unsigned long long)placed.pages_done,
                info.dirty_sync_count);
        return 1;
    }
    /* The destination's own view: active while rounds ran, complete now, with the rounds the
     * source sent and the bytes and pages its statistics count; a sender's control has none of
     * it. */
    if (dest.status != PW_MIGRATION_STATUS_COMPLETED || !v.receiver_saw_active ||
        v.receiver_rounds_seen < 1 || dest.rounds != info.rounds ||
        dest.transferred_bytes != got.transferred_bytes || dest.device_state_bytes == 0 ||
        dest.pages_placed != placed.pages_done || dest.memory_pages != LOW_PAGES + HIGH_PAGES ||
        pw_control_receiver(control, &dest) != PW_STATUS_INVALID) {
        fprintf(stderr,
                "the destination's figures disagree: status %d, active seen %d after %u rounds, "
                "%u rounds (the source's %u), %llu bytes (stats %llu), device state %llu bytes\n",
                (int)dest.status, v.receiver_saw_active, v.receiver_rounds_seen, dest.rounds,
                info.rounds, (unsigned long long)dest.transferred_bytes,
                (unsigned long long)got.transferred_bytes,
                (unsigned long long)dest.device_state_bytes);
        return 1;
    }
    if (memcmp(v.mem[0], dst_low, LOW_PAGES * PAGE) || memcmp(v.mem[1], dst_high, HIGH_PAGES * PAGE)) {
        fprintf(stderr, "the destination differs from the paused source\n");
        return 1;
    }
    uint32_t tag = 0;
    const uint8_t *bytes = NULL;
    size_t len = 0;
    uint64_t counter = 0;
    if (pw_receiver_blob_count(r.receiver) != 2 ||
        !check(pw_receiver_blob(r.receiver, 0, &tag, &bytes, &len), "pw_receiver_blob") ||
        tag != VCPU_TAG || len != sizeof counter) {
        fprintf(stderr, "the vCPU blob did not arrive intact\n");
        return 1;
    }
    memcpy(&counter, bytes, len);
    if (counter != v.counter ||
        !check(pw_receiver_blob(r.receiver, 1, &tag, &bytes, &len), "pw_receiver_blob") ||
        tag != DEV_TAG || strcmp((const char *)bytes, "a device model's state") != 0) {
        fprintf(stderr, "the device state did not arrive intact\n");
        return 1;
    }
    printf("verified live: the vCPU wrote %llu pages meanwhile; %u rounds, downtime %.1f ms "
           "(expected %.1f ms), %.0f ms in all, %llu bytes on the wire, %u dirty syncs\n",
           (unsigned long long)counter, info.rounds, info.downtime_ms, info.expected_downtime_ms,
           info.total_time_ms, (unsigned long long)info.transferred_bytes, info.dirty_sync_count);
    pw_control_free(control);
    pw_control_free(receiver_control);
    pw_sender_free(sender);
    pw_receiver_free(r.receiver);
    pw_memory_free(src);
    pw_memory_free(dst);
    return 0;
}
