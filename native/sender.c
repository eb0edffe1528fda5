/* nbdquorum C core: a socket's sending side on its own thread (see quorum.h). */
#define _GNU_SOURCE
#include "quorum.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h> /* struct iovec */
#include <unistd.h>

#define BATCH 64 /* buffers per sendmsg: well under IOV_MAX */

struct quorum_sender {
    int fd;   /* owned: a duplicate of the caller's socket */
    int wake; /* eventfd: ends a wait for the socket to take more */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct iovec *q; /* queued buffers, q[head..tail) */
    size_t head, tail, cap;
    int waiting; /* the thread sleeps on cv */
    int stopping; /* stop now: what is still queued is never written */
    int ended;    /* the thread is past its loop */
    int err;      /* first write error (positive errno), 0 while none */
    int told;     /* the caller's eventfd: the queue went down to wake_below (or the
                   * thread ended) */
    int64_t wake_below; /* -1: nobody waits */
    uint64_t queued; /* bytes queued and not written */
    _Atomic uint64_t sent; /* bytes written to the socket so far */
};

/* (mu held) tell a waiter once the queue is down to its mark, or will never be */
static void maybe_tell(struct quorum_sender *s, int ended)
{
    if (s->wake_below >= 0 && (ended || s->queued <= (uint64_t)s->wake_below)) {
        uint64_t one = 1;
        ssize_t w = write(s->told, &one, sizeof one);
        (void)w;
        s->wake_below = -1;
    }
}

static int wait_writable(struct quorum_sender *s)
{
    struct pollfd p[2] = {{.fd = s->fd, .events = POLLOUT},
                          {.fd = s->wake, .events = POLLIN}};
    for (;;) {
        if (poll(p, 2, -1) >= 0)
            return 0;
        if (errno != EINTR)
            return errno;
    }
}

static void *run(void *arg)
{
    struct quorum_sender *s = arg;
    struct iovec iov[BATCH];
    sigset_t all; /* the process's signals go to its other threads, never here */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->head == s->tail && !s->stopping) {
            s->waiting = 1;
            pthread_cond_wait(&s->cv, &s->mu);
            s->waiting = 0;
        }
        if (s->stopping || s->err)
            break;
        size_t k = s->tail - s->head;
        if (k > BATCH)
            k = BATCH;
        memcpy(iov, s->q + s->head, k * sizeof *iov);
        pthread_mutex_unlock(&s->mu);
        /* never blocks, whatever the descriptor's flags (a stop is never stuck in
         * here), and a peer that is gone is an error, not a SIGPIPE */
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = k};
        ssize_t n = sendmsg(s->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        int e = n < 0 ? errno : 0;
        if (e == EAGAIN || e == EWOULDBLOCK) /* the socket is full: wait for room */
            e = wait_writable(s);
        pthread_mutex_lock(&s->mu);
        if (e && e != EAGAIN && e != EWOULDBLOCK && e != EINTR) {
            s->err = e;
            break;
        }
        if (n <= 0)
            continue;
        atomic_fetch_add(&s->sent, (uint64_t)n);
        s->queued -= (uint64_t)n;
        size_t left = (size_t)n;
        while (left) {
            struct iovec *v = &s->q[s->head];
            if (left >= v->iov_len) {
                left -= v->iov_len;
                s->head++;
            } else {
                v->iov_base = (uint8_t *)v->iov_base + left;
                v->iov_len -= left;
                left = 0;
            }
        }
        if (s->head == s->tail)
            s->head = s->tail = 0;
        maybe_tell(s, 0);
    }
    s->head = s->tail = 0; /* nothing queued is touched again */
    s->ended = 1;
    if (s->err && s->wake_below < 0)
        s->wake_below = 0; /* a failed write is told even with no waiter */
    maybe_tell(s, 1);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int quorum_sender_new(int fd, int told, quorum_sender **out)
{
    struct quorum_sender *s = calloc(1, sizeof *s);
    if (!s)
        return -ENOMEM;
    s->fd = fd;
    s->wake_below = -1;
    s->told = told;
    s->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake < 0) {
        int e = errno;
        free(s);
        return -e;
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    int rc = pthread_create(&s->thread, NULL, run, s);
    if (rc) {
        close(s->wake);
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        free(s);
        return -rc;
    }
    *out = s;
    return 0;
}

int quorum_sender_push(quorum_sender *s, uint8_t *const bufs[], const size_t lens[],
                       size_t n)
{
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (s->err || s->stopping) {
        rc = -(s->err ? s->err : EPIPE);
        goto out;
    }
    if (s->tail + n > s->cap) {
        if (s->head) { /* slide down before growing */
            memmove(s->q, s->q + s->head, (s->tail - s->head) * sizeof *s->q);
            s->tail -= s->head;
            s->head = 0;
        }
        if (s->tail + n > s->cap) {
            size_t cap = s->cap ? s->cap : 64;
            while (cap < s->tail + n)
                cap *= 2;
            struct iovec *q = realloc(s->q, cap * sizeof *q);
            if (!q) {
                rc = -ENOMEM;
                goto out;
            }
            s->q = q;
            s->cap = cap;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (!lens[i])
            continue;
        s->q[s->tail].iov_base = bufs[i];
        s->q[s->tail].iov_len = lens[i];
        s->tail++;
        s->queued += lens[i];
    }
    if (s->waiting)
        pthread_cond_signal(&s->cv);
out:
    pthread_mutex_unlock(&s->mu);
    return rc;
}

uint64_t quorum_sender_sent(quorum_sender *s)
{
    return atomic_load(&s->sent);
}

int quorum_sender_wake_below(quorum_sender *s, uint64_t nbytes)
{
    pthread_mutex_lock(&s->mu);
    s->wake_below = nbytes > INT64_MAX ? INT64_MAX : (int64_t)nbytes;
    maybe_tell(s, s->ended);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int quorum_sender_error(quorum_sender *s)
{
    pthread_mutex_lock(&s->mu);
    int e = s->err;
    pthread_mutex_unlock(&s->mu);
    return e;
}

void quorum_sender_stop(quorum_sender *s)
{
    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    uint64_t one = 1;
    ssize_t w = write(s->wake, &one, sizeof one); /* ends a wait for the socket */
    (void)w;
}

void quorum_sender_free(quorum_sender *s)
{
    quorum_sender_stop(s);
    pthread_join(s->thread, NULL);
    close(s->fd);
    close(s->wake);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s->q);
    free(s);
}
