/* nbdquorum C core: quorum voting and child I/O over caller-owned buffers.
 *
 * Plain C, no Python.h: the caller passes every pointer and length and owns
 * every buffer; nothing allocated here crosses the boundary.  Every function
 * returns int: >= 0 is a result (a child index, a count or a flag), < 0 is
 * -errno.  One exception to "nothing allocated crosses": the sender's opaque
 * handle (below), made and freed here.
 * None of them call back into Python, so cffi runs them without the GIL.
 *
 * Voting follows qemu/qemu block/quorum.c (quorum_vote): children whose
 * contents are byte-identical form one "version"; the version with the most
 * members wins if it has at least `threshold` members.  Two differences from
 * QEMU: versions are found with memcmp (no hashing ever), and a tie for the
 * most members fails with -EIO instead of picking one: we never guess.
 *
 * The prototypes below are repeated, declarations only, in quorum.cdef for
 * cffi; the cffi build compiles against this header, so a drifted cdef fails
 * the build rather than the run.
 */
#ifndef NBDQUORUM_QUORUM_H
#define NBDQUORUM_QUORUM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Vote over nbufs buffers of len bytes each.
 *
 * bufs[i] == NULL: child i failed or is absent and does not vote.
 * group_out[i] := index of the first buffer of i's version (its
 * representative), or -1 for a NULL buffer.  group_out is filled even when
 * the vote fails, so the caller can report who disagreed.
 *
 * Fast path: memcmp of the first non-NULL buffer with each other one.  On a
 * mismatch the remaining buffers are grouped by memcmp against each version's
 * representative.
 *
 * Returns the representative index of the winning version: the version with
 * the most members, if that count >= threshold and no other version has the
 * same count.  Otherwise, or if every buffer is NULL, -EIO.
 * threshold < 1, nbufs == 0 or nbufs > INT32_MAX: -EINVAL. */
int quorum_vote(const uint8_t *const bufs[], size_t nbufs, size_t len,
                int threshold, int32_t group_out[]);

/* Compare a and b (len bytes each).  Returns 0 if they are equal; 1 if they
 * differ, with span_out[0] = offset of the first differing byte and
 * span_out[1] = one past the last differing byte.  -EINVAL on NULL pointers. */
int quorum_diff_span(const uint8_t *a, const uint8_t *b, size_t len,
                     uint64_t span_out[2]);

/* For each i with fds[i] >= 0: pread len bytes at offset into bufs[i],
 * looping on short reads and EINTR; reaching EOF before len bytes is EIO.
 * errs_out[i] := 0 or the errno.  fds[i] < 0: child i is skipped,
 * errs_out[i] := -1, and it does not vote.
 *
 * Then votes, as quorum_vote, over the children that read OK (the others
 * count as NULL buffers), and returns as quorum_vote.  The reads run one
 * after another in the calling thread.
 * -EINVAL, before any I/O: nfds == 0, threshold < 1, offset + len beyond
 * INT64_MAX, or a NULL bufs[i] for a child that is to be read. */
int quorum_pread_vote(const int fds[], size_t nfds, uint64_t offset,
                      size_t len, uint8_t *const bufs[], int errs_out[],
                      int threshold, int32_t group_out[]);

/* pwrite len bytes of buf at offset to every fds[i] >= 0, looping on short
 * writes and EINTR (a write that makes no progress is EIO); if sync is
 * non-zero, fdatasync each child after its write.  errs_out[i] := 0, the
 * errno, or -1 for a skipped child (fds[i] < 0).
 * Returns the number of children that succeeded.
 * -EINVAL, before any I/O: NULL buf with len > 0, or offset + len beyond
 * INT64_MAX. */
int quorum_pwrite_all(const int fds[], size_t nfds, uint64_t offset,
                      const uint8_t *buf, size_t len, int sync,
                      int errs_out[]);

/* As quorum_pread_vote, but never blocks: every child is read with one
 * preadv2(RWF_NOWAIT); if any would block (data not in the page cache, or a
 * short read), returns -EAGAIN before voting and the caller retries with
 * quorum_pread_vote on a worker thread; -EOPNOTSUPP if the file system
 * cannot tell (tmpfs, for one).  Lets the event loop serve small page-cache
 * hits without a thread hop. */
int quorum_pread_vote_nowait(const int fds[], size_t nfds, uint64_t offset,
                             size_t len, uint8_t *const bufs[], int errs_out[],
                             int threshold, int32_t group_out[]);

/* As quorum_pwrite_all without sync, trying pwritev2(RWF_NOWAIT) first.
 * Returns -EAGAIN (or -EOPNOTSUPP where the file system cannot tell),
 * having written nothing, if the first child would block;
 * once a child took the data, the rest are written (blocking if need be), so
 * the children never differ.  Returns the number of children that succeeded. */
int quorum_pwrite_all_nowait(const int fds[], size_t nfds, uint64_t offset,
                             const uint8_t *buf, size_t len, int errs_out[]);

/* Deallocate len bytes at offset (fallocate PUNCH_HOLE | KEEP_SIZE): the
 * range then reads as zeroes and the file keeps its size.  Returns 1 if done
 * (len == 0 is done), 0 if the file or system cannot (EOPNOTSUPP, ENOSYS, or
 * not Linux), else -errno. */
int quorum_punch_hole(int fd, uint64_t offset, uint64_t len);

/* Zero len bytes at offset without writing them (fallocate ZERO_RANGE |
 * KEEP_SIZE).  Returns as quorum_punch_hole. */
int quorum_zero_range(int fd, uint64_t offset, uint64_t len);

/* Tune the C allocator for a server that allocates many buffers of up to
 * max_buffer bytes: glibc's default serves allocations of 128 KiB and more
 * with a fresh mmap (and munmap on free), which costs more than reading and
 * voting a 1 MiB request.  Raise the mmap threshold so such buffers are
 * reused from the heap, and the trim threshold so the heap is not shrunk
 * after every request.  Returns 1 if applied, 0 if not glibc. */
int quorum_tune_malloc(size_t max_buffer);

/* A socket's sending side on a thread of its own (sender.c): the event loop
 * queues buffers and goes on; the thread writes them, in order (sendmsg, never
 * blocking, no SIGPIPE), waiting (poll) while the socket's buffer is full; it
 * blocks every signal.  The kernel's copy and,
 * over TCP, the protocol work of each send then leave the event loop's core.
 *
 * The one object here that lives across calls: an opaque handle, made by
 * quorum_sender_new and released by quorum_sender_free, nothing else.
 *
 * quorum_sender_new takes ownership of fd (a duplicate of a connected,
 * possibly non-blocking, stream socket; it is closed by quorum_sender_free)
 * and starts the thread.  told: the caller's eventfd (kept open by the caller
 * until quorum_sender_free returns) for quorum_sender_wake_below.  Returns 0
 * and the handle in *out, or -errno.
 *
 * quorum_sender_push queues n buffers (bufs[i], lens[i] bytes) after those
 * already queued.  The caller keeps each buffer alive and unchanged until
 * quorum_sender_sent has counted past its last byte, or quorum_sender_free
 * returned.  Returns 0, or -errno: the first write error (the socket failed),
 * -EPIPE after quorum_sender_stop, -ENOMEM; nothing is queued then.
 *
 * quorum_sender_sent: the bytes written to the socket so far (every queued
 * byte counts once, in queue order).  quorum_sender_error: the first write's
 * errno, 0 while none failed.
 *
 * quorum_sender_wake_below: the thread makes told readable (adds 1) once no
 * more than nbytes are queued (at once if that is so already), or the thread
 * has ended; once per call.  Returns 0.  A write that fails makes told readable
 * too, whether or not anyone waits (quorum_sender_error then says why).
 *
 * quorum_sender_stop: the thread stops at once (a wait for the socket ends
 * too); what is still queued is never written.  quorum_sender_free stops,
 * joins the thread, closes fd and frees the handle: after it returns no
 * queued buffer is touched again. */
typedef struct quorum_sender quorum_sender;
int quorum_sender_new(int fd, int told, quorum_sender **out);
int quorum_sender_push(quorum_sender *s, uint8_t *const bufs[], const size_t lens[],
                       size_t n);
uint64_t quorum_sender_sent(quorum_sender *s);
int quorum_sender_wake_below(quorum_sender *s, uint64_t nbytes);
int quorum_sender_error(quorum_sender *s);
void quorum_sender_stop(quorum_sender *s);
void quorum_sender_free(quorum_sender *s);

/* Small writes to local files on a thread of their own (writer.c): the event
 * loop queues a job and goes on; the thread writes each job's buffer to each of
 * its descriptors (as quorum_pwrite_all without sync), jobs in queue order, one
 * at a time; it blocks every signal.  Meant for a write whose answer waits on a
 * slower child anyway (one on another host): the page cache's copies then run
 * beside the event loop instead of on it.
 *
 * quorum_writer_new starts the thread.  told: the caller's eventfd (kept open
 * until quorum_writer_free returns), made readable (adds 1) when a job the
 * caller asked to be told of is done.  Returns 0 and the handle, or -errno.
 *
 * quorum_writer_submit queues a write of len bytes of buf at offset to each of
 * fds[0..nfds) (a negative one is skipped) and gives its job in *out.  The
 * caller keeps fds and buf alive and unchanged, and the descriptors open, until
 * quorum_wjob_done has said 1 (or quorum_writer_free returned).  The thread
 * is not woken for it: quorum_writer_kick does that, once for every job
 * submitted since (one wakeup for a batch).  Returns 0, -EINVAL, -ENOMEM, or
 * -EPIPE once stopping; nothing is queued then.
 *
 * quorum_wjob_done: 1 once j is written, else 0; with tell, a 0 also asks the
 * thread to make told readable when j is done.  quorum_wjob_finish (once j is
 * done, exactly once): the number of descriptors whose write failed; when that
 * is not 0 and errs_out is not NULL, errs_out[0..nfds) gets 0, the errno or -1
 * (skipped) for each.  It frees j.
 *
 * quorum_writer_busy_ns: how long the job being written has taken so far, 0
 * when the thread is idle (a stuck disk shows here).
 *
 * quorum_writer_free writes what is still queued, joins the thread and frees
 * the handle: every job submitted is done when it returns (each still to be
 * finished by its owner). */
typedef struct quorum_wjob quorum_wjob;
typedef struct quorum_writer quorum_writer;
int quorum_writer_new(int told, quorum_writer **out);
int quorum_writer_submit(quorum_writer *w, const int fds[], size_t nfds, uint64_t offset,
                         const uint8_t *buf, size_t len, quorum_wjob **out);
void quorum_writer_kick(quorum_writer *w);
int quorum_wjob_done(quorum_wjob *j, int tell);
int quorum_wjob_finish(quorum_wjob *j, int errs_out[]);
int64_t quorum_writer_busy_ns(quorum_writer *w);
void quorum_writer_free(quorum_writer *w);

#ifdef __cplusplus
}
#endif

#endif /* NBDQUORUM_QUORUM_H */
