/* UDP load generator and echo server for bench/udp.py (issue 11's benchmark).
 *
 * bench/udp.py compiles it with `gcc -O2` into a temporary directory at run time. A Python
 * client moving one datagram per system call tops out well below what the proxies under test
 * can carry, so the figures measured its limits rather than theirs; this one moves up to 64
 * datagrams per recvmmsg/sendmmsg and costs a few hundred nanoseconds per datagram.
 *
 *   udpgen saturate IP PORT FLOWS WINDOW SIZE SECONDS
 *       FLOWS connected sockets (one session each through a proxy), each keeping WINDOW
 *       datagrams of SIZE bytes in flight; a flow without an answer for 200 ms is refilled
 *       (datagrams lost on the way). Prints {"answers_per_s", "mb_per_s", "answered", "sent",
 *       "seconds", "cpu_s"} (cpu_s: its own user + system time).
 *   udpgen rate IP PORT RATE SIZE SECONDS
 *       One socket, one datagram in flight, RATE a second: round-trip times. An answer
 *       counts only for the datagram it echoes (a sequence number in bytes 1-8); no answer in
 *       500 ms is lost. Prints {"p50_us", "p99_us", "samples", "lost"}.
 *   udpgen echo PORT IP TAG [IP TAG ...]
 *       Answers every datagram to IP:PORT with its first byte replaced by TAG's first
 *       character. Prints "ready" once bound.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SIZE 65536
#define REFILL_NS 200000000LL

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in address(const char *ip, int port) {
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", ip);
        exit(2);
    }
    return sa;
}

static int udp_socket(int nonblocking) {
    int fd = socket(AF_INET, SOCK_DGRAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        die("socket");
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    return fd;
}

/* One batch of BATCH datagrams, each with its own buffer and sender address. */
struct batch {
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in names[BATCH];
    char *data;
};

static void batch_init(struct batch *b, size_t size) {
    b->data = malloc((size_t)BATCH * size);
    if (!b->data)
        die("malloc");
    memset(b->data, 'x', (size_t)BATCH * size);
    for (int i = 0; i < BATCH; i++) {
        b->iov[i].iov_base = b->data + (size_t)i * size;
        b->iov[i].iov_len = size;
        memset(&b->msgs[i], 0, sizeof b->msgs[i]);
        b->msgs[i].msg_hdr.msg_iov = &b->iov[i];
        b->msgs[i].msg_hdr.msg_iovlen = 1;
    }
}

struct flow {
    int fd;
    int inflight;
    int64_t last_answer;
};

/* Send up to `count` datagrams from `tx` (connected socket); returns how many left. */
static int send_some(int fd, struct batch *tx, int count) {
    int sent = 0;
    while (sent < count) {
        int k = count - sent > BATCH ? BATCH : count - sent;
        int r = sendmmsg(fd, tx->msgs, (unsigned)k, MSG_DONTWAIT);
        if (r <= 0)
            break;
        sent += r;
    }
    return sent;
}

static int saturate(char **argv) {
    struct sockaddr_in to = address(argv[0], atoi(argv[1]));
    int flows = atoi(argv[2]), window = atoi(argv[3]), size = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (flows < 1 || window < 1 || size < 1 || size > MAX_SIZE)
        return 2;
    struct batch tx, rx;
    batch_init(&tx, (size_t)size);
    batch_init(&rx, MAX_SIZE);
    for (int i = 0; i < BATCH; i++)
        tx.iov[i].iov_len = (size_t)size;
    int ep = epoll_create1(0);
    struct flow *flow = calloc((size_t)flows, sizeof *flow);
    int64_t start = now_ns();
    for (int i = 0; i < flows; i++) {
        flow[i].fd = udp_socket(1);
        if (connect(flow[i].fd, (struct sockaddr *)&to, sizeof to) < 0)
            die("connect");
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, flow[i].fd, &ev);
        flow[i].last_answer = start;
    }
    long long answered = 0, sent = 0, bytes = 0;
    for (int i = 0; i < flows; i++) {
        flow[i].inflight = send_some(flow[i].fd, &tx, window);
        sent += flow[i].inflight;
    }
    int64_t end = start + (int64_t)(seconds * 1e9), last_check = start;
    struct epoll_event events[256];
    for (;;) {
        int64_t now = now_ns();
        if (now >= end)
            break;
        if (now - last_check > REFILL_NS / 4) {
            last_check = now;
            for (int i = 0; i < flows; i++) {
                if (now - flow[i].last_answer > REFILL_NS) {
                    flow[i].inflight = 0;
                    flow[i].last_answer = now;
                    int k = send_some(flow[i].fd, &tx, window);
                    flow[i].inflight = k;
                    sent += k;
                }
            }
        }
        int n = epoll_wait(ep, events, 256, 50);
        for (int e = 0; e < n; e++) {
            struct flow *f = &flow[events[e].data.u32];
            for (;;) {
                int r = recvmmsg(f->fd, rx.msgs, BATCH, MSG_DONTWAIT, NULL);
                if (r <= 0)
                    break; /* EAGAIN, or an ICMP error (ECONNREFUSED), now cleared */
                answered += r;
                for (int i = 0; i < r; i++)
                    bytes += rx.msgs[i].msg_len;
                f->inflight = f->inflight > r ? f->inflight - r : 0;
                if (r < BATCH)
                    break;
            }
            f->last_answer = now_ns();
            int k = send_some(f->fd, &tx, window - f->inflight);
            f->inflight += k;
            sent += k;
        }
    }
    double took = (double)(now_ns() - start) / 1e9;
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = (double)(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
                 (double)(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
    printf("{\"answers_per_s\": %.1f, \"mb_per_s\": %.3f, \"answered\": %lld, \"sent\": %lld, "
           "\"seconds\": %.3f, \"cpu_s\": %.3f}\n",
           (double)answered / took, (double)bytes / took / 1e6, answered, sent, took, cpu);
    return 0;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile of sorted values, as bench/proxy.py's percentile rounds it. */
static double percentile(const double *sorted, long n, double p) {
    if (n == 0)
        return -1;
    long i = (long)(p / 100.0 * (double)(n - 1) + 0.5);
    return sorted[i < 0 ? 0 : (i >= n ? n - 1 : i)];
}

static int rate(char **argv) {
    struct sockaddr_in to = address(argv[0], atoi(argv[1]));
    double per_second = atof(argv[2]), seconds = atof(argv[4]);
    int size = atoi(argv[3]);
    if (per_second <= 0 || size < 9 || size > MAX_SIZE)
        return 2;
    int fd = udp_socket(0);
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0)
        die("connect");
    struct timeval wait = {.tv_sec = 0, .tv_usec = 500000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
    long capacity = (long)(per_second * seconds) + 16, samples = 0, lost = 0;
    double *rtt = malloc((size_t)capacity * sizeof *rtt);
    char *out = malloc((size_t)size), *in = malloc(MAX_SIZE);
    memset(out, 'x', (size_t)size);
    int64_t interval = (int64_t)(1e9 / per_second), next = now_ns();
    int64_t end = next + (int64_t)(seconds * 1e9);
    for (uint64_t seq = 1; next < end && samples < capacity; seq++) {
        struct timespec at = {.tv_sec = next / 1000000000LL, .tv_nsec = next % 1000000000LL};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL);
        next += interval;
        memcpy(out + 1, &seq, sizeof seq);
        int64_t t0 = now_ns();
        if (send(fd, out, (size_t)size, 0) < 0) {
            lost++;
            continue;
        }
        for (;;) {
            ssize_t r = recv(fd, in, MAX_SIZE, 0);
            if (r < 0) {
                lost++; /* timed out, or an ICMP error */
                break;
            }
            if (r >= 9 && memcmp(in + 1, &seq, sizeof seq) == 0) {
                rtt[samples++] = (double)(now_ns() - t0) / 1e3;
                break;
            } /* else a late answer to an earlier datagram: keep waiting for this one */
        }
        if (next < now_ns())
            next = now_ns(); /* behind (a loss): no burst to catch up */
    }
    qsort(rtt, (size_t)samples, sizeof *rtt, by_value);
    printf("{\"p50_us\": %.1f, \"p99_us\": %.1f, \"samples\": %ld, \"lost\": %ld}\n",
           percentile(rtt, samples, 50), percentile(rtt, samples, 99), samples, lost);
    return 0;
}

static int echo(int argc, char **argv) {
    int port = atoi(argv[0]), count = (argc - 1) / 2;
    if (count < 1)
        return 2;
    int ep = epoll_create1(0);
    char *tags = malloc((size_t)count);
    int *fds = malloc((size_t)count * sizeof *fds);
    for (int i = 0; i < count; i++) {
        struct sockaddr_in sa = address(argv[1 + 2 * i], port);
        fds[i] = udp_socket(1);
        int size = 8 << 20;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        if (bind(fds[i], (struct sockaddr *)&sa, sizeof sa) < 0)
            die("bind");
        tags[i] = argv[2 + 2 * i][0];
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    struct batch b;
    batch_init(&b, MAX_SIZE);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            for (;;) {
                for (int k = 0; k < BATCH; k++) {
                    b.iov[k].iov_len = MAX_SIZE;
                    b.msgs[k].msg_hdr.msg_name = &b.names[k];
                    b.msgs[k].msg_hdr.msg_namelen = sizeof b.names[k];
                }
                int r = recvmmsg(fds[i], b.msgs, BATCH, MSG_DONTWAIT, NULL);
                if (r <= 0)
                    break;
                for (int k = 0; k < r; k++) {
                    b.iov[k].iov_len = b.msgs[k].msg_len;
                    if (b.msgs[k].msg_len > 0)
                        ((char *)b.iov[k].iov_base)[0] = tags[i];
                }
                int done = 0;
                while (done < r) {
                    int s = sendmmsg(fds[i], b.msgs + done, (unsigned)(r - done), MSG_DONTWAIT);
                    if (s <= 0) {
                        done++; /* full queue or a departed peer: drop one */
                        continue;
                    }
                    done += s;
                }
                if (r < BATCH)
                    break;
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc >= 8 && strcmp(argv[1], "saturate") == 0)
        return saturate(argv + 2);
    if (argc >= 7 && strcmp(argv[1], "rate") == 0)
        return rate(argv + 2);
    if (argc >= 5 && strcmp(argv[1], "echo") == 0)
        return echo(argc - 2, argv + 2);
    fprintf(stderr, "usage: udpgen saturate IP PORT FLOWS WINDOW SIZE SECONDS\n"
                    "       udpgen rate IP PORT RATE SIZE SECONDS\n"
                    "       udpgen echo PORT IP TAG [IP TAG ...]\n");
    return 2;
}
