/* nbdquorum C core: small writes to local files on a thread of their own (see
 * quorum.h). */
#define _GNU_SOURCE
#include "quorum.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* job states (quorum_wjob.state) */
enum { QUEUED = 0, DONE = 1, TELL = 2 /* queued, and the caller wants told */ };

struct quorum_writer {
    int told; /* the caller's eventfd */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    quorum_wjob *head, *tail; /* queued jobs, head first */
    int waiting;              /* the thread sleeps on cv */
    int stopping;             /* write what is queued, then end */
    int64_t started;          /* (atomic) CLOCK_MONOTONIC ns the job being written began, 0: idle */
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct quorum_wjob {
    const int *fds;
    size_t nfds;
    uint64_t offset;
    const uint8_t *buf;
    size_t len;
    int state;
    int failed; /* descriptors whose write failed */
    struct quorum_wjob *next;
    int errs[]; /* nfds */
};

static void write_job(quorum_wjob *j)
{
    int rc = quorum_pwrite_all(j->fds, j->nfds, j->offset, j->buf, j->len, 0, j->errs);
    j->failed = 0;
    for (size_t i = 0; i < j->nfds; i++) {
        if (rc < 0) /* bad arguments: every child written to failed with that */
            j->errs[i] = j->fds[i] < 0 ? -1 : -rc;
        j->failed += j->errs[i] > 0;
    }
}

static void *run(void *arg)
{
    struct quorum_writer *w = arg;
    sigset_t all; /* the process's signals go to its other threads, never here */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->head && !w->stopping) {
            w->waiting = 1;
            pthread_cond_wait(&w->cv, &w->mu);
            w->waiting = 0;
        }
        quorum_wjob *j = w->head;
        if (!j)
            break; /* stopping, and nothing is left */
        w->head = j->next;
        if (!w->head)
            w->tail = NULL;
        __atomic_store_n(&w->started, now_ns(), __ATOMIC_RELAXED);
        pthread_mutex_unlock(&w->mu);
        write_job(j);
        /* the last touch of j: once DONE is seen its owner may free it */
        if (__atomic_exchange_n(&j->state, DONE, __ATOMIC_ACQ_REL) == TELL) {
            uint64_t one = 1;
            ssize_t n = write(w->told, &one, sizeof one);
            (void)n;
        }
        pthread_mutex_lock(&w->mu);
        __atomic_store_n(&w->started, 0, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int quorum_writer_new(int told, quorum_writer **out)
{
    struct quorum_writer *w = calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    w->told = told;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    int rc = pthread_create(&w->thread, NULL, run, w);
    if (rc) {
        pthread_cond_destroy(&w->cv);
        pthread_mutex_destroy(&w->mu);
        free(w);
        return -rc;
    }
    *out = w;
    return 0;
}

int quorum_writer_submit(quorum_writer *w, const int fds[], size_t nfds, uint64_t offset,
                         const uint8_t *buf, size_t len, quorum_wjob **out)
{
    if ((nfds && !fds) || (len && !buf) || nfds > 4096)
        return -EINVAL;
    quorum_wjob *j = malloc(sizeof *j + nfds * sizeof j->errs[0]);
    if (!j)
        return -ENOMEM;
    *j = (quorum_wjob){.fds = fds, .nfds = nfds, .offset = offset, .buf = buf, .len = len};
    pthread_mutex_lock(&w->mu);
    if (w->stopping) {
        pthread_mutex_unlock(&w->mu);
        free(j);
        return -EPIPE;
    }
    if (w->tail)
        w->tail->next = j;
    else
        w->head = j;
    w->tail = j;
    pthread_mutex_unlock(&w->mu);
    *out = j;
    return 0;
}

void quorum_writer_kick(quorum_writer *w)
{
    pthread_mutex_lock(&w->mu);
    if (w->waiting && w->head)
        pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

int quorum_wjob_finish(quorum_wjob *j, int errs_out[])
{
    int failed = j->failed;
    if (failed && errs_out)
        memcpy(errs_out, j->errs, j->nfds * sizeof j->errs[0]);
    free(j);
    return failed;
}

int quorum_wjob_done(quorum_wjob *j, int tell)
{
    if (tell) {
        int expect = QUEUED;
        if (__atomic_compare_exchange_n(&j->state, &expect, TELL, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return 0;
        return expect == DONE;
    }
    return __atomic_load_n(&j->state, __ATOMIC_ACQUIRE) == DONE;
}

int64_t quorum_writer_busy_ns(quorum_writer *w)
{
    int64_t t = __atomic_load_n(&w->started, __ATOMIC_RELAXED);
    return t ? now_ns() - t : 0;
}

void quorum_writer_free(quorum_writer *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
