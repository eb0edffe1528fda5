/* nbdquorum C core; see quorum.h for the contract of each function.
 *
 * Theory of operation: the Python side hands over pointers to buffers it owns
 * (cffi's from_buffer, zero-copy) and arrays for the per-child results.
 * Nothing here allocates or calls back into Python, so cffi drops the GIL
 * for the whole call and a thread pool can vote while the event loop runs.
 *
 * Voting never hashes.  In the common case every child agrees, and one
 * memcmp per extra child (a few GB/s per core, stopping at the first
 * difference when they do not agree) is cheaper than hashing even once.
 */
#define _FILE_OFFSET_BITS 64
#define _GNU_SOURCE /* pread, pwrite, fdatasync, fallocate */

#include "quorum.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h> /* preadv2, pwritev2, RWF_NOWAIT */
#include <unistd.h>

#ifdef __linux__
#include <linux/falloc.h>
#endif

/* diff_span scans in chunks of these sizes, narrowing to bytes only inside
 * the one chunk that holds the difference. */
#define SPAN_CHUNK ((size_t)4096)
/* quorum_pread_vote reads and compares big requests in pieces of this size,
 * so that N children's pieces stay in the CPU cache between read and compare */
#define PIECE ((size_t)256 << 10)
#define SPAN_SUB ((size_t)64)

/* Upper bound for one pread/pwrite call: Linux caps a transfer at
 * 0x7ffff000 bytes anyway, and this keeps the count well inside ssize_t. */
#define IO_MAX ((size_t)1 << 30)

static int same_bytes(const uint8_t *a, const uint8_t *b, size_t len)
{
    return a == b || memcmp(a, b, len) == 0;
}

/* Child i votes if its buffer is non-NULL and, when errs is given, its read
 * succeeded (errs[i] == 0). */
static int votes(const uint8_t *const bufs[], const int errs[], size_t i)
{
    return bufs[i] != NULL && (errs == NULL || errs[i] == 0);
}

/* The vote shared by quorum_vote and quorum_pread_vote.  Arguments were
 * checked by the caller. */
static int vote_core(const uint8_t *const bufs[], const int errs[],
                     size_t n, size_t len, int threshold, int32_t group[])
{
    size_t first = SIZE_MAX;
    size_t i, j;

    for (i = 0; i < n; i++) {
        group[i] = -1;
        if (first == SIZE_MAX && votes(bufs, errs, i))
            first = i;
    }
    if (first == SIZE_MAX)
        return -EIO;
    group[first] = (int32_t)first;

    /* Fast path: everyone agrees with the first voter. */
    for (i = first + 1; i < n; i++) {
        if (!votes(bufs, errs, i))
            continue;
        if (!same_bytes(bufs[first], bufs[i], len))
            break;
        group[i] = (int32_t)first;
    }

    /* Slow path from the first mismatch on: compare against each version's
     * representative (group[j] == j) seen so far.  The mismatching child is
     * already known to differ from `first`. */
    if (i < n) {
        size_t mismatch = i;

        for (; i < n; i++) {
            if (!votes(bufs, errs, i))
                continue;
            group[i] = (int32_t)i;
            for (j = first; j < i; j++) {
                if (group[j] != (int32_t)j)
                    continue;
                if (i == mismatch && j == first)
                    continue;
                if (same_bytes(bufs[j], bufs[i], len)) {
                    group[i] = (int32_t)j;
                    break;
                }
            }
        }
    }

    /* Count members per version; n is the number of children, so O(n^2)
     * integer work is nothing next to the memcmps above. */
    {
        size_t best = 0, winner = SIZE_MAX;
        int tie = 0;

        for (j = first; j < n; j++) {
            size_t count = 0;

            if (group[j] != (int32_t)j)
                continue;
            for (i = j; i < n; i++)
                count += group[i] == (int32_t)j;
            if (count > best) {
                best = count;
                winner = j;
                tie = 0;
            } else if (count == best) {
                tie = 1;
            }
        }
        if (tie || best < (size_t)threshold)
            return -EIO;
        return (int)winner;
    }
}

int quorum_vote(const uint8_t *const bufs[], size_t nbufs, size_t len,
                int threshold, int32_t group_out[])
{
    if (nbufs == 0 || nbufs > INT32_MAX || threshold < 1 || bufs == NULL ||
        group_out == NULL)
        return -EINVAL;
    return vote_core(bufs, NULL, nbufs, len, threshold, group_out);
}

/* Offset of the first byte where a and b differ, or len if they are equal. */
static size_t first_diff(const uint8_t *a, const uint8_t *b, size_t len)
{
    size_t off = 0, end;

    while (len - off >= SPAN_CHUNK && memcmp(a + off, b + off, SPAN_CHUNK) == 0)
        off += SPAN_CHUNK;
    end = len - off >= SPAN_CHUNK ? off + SPAN_CHUNK : len;
    while (end - off >= SPAN_SUB && memcmp(a + off, b + off, SPAN_SUB) == 0)
        off += SPAN_SUB;
    while (off < end && a[off] == b[off])
        off++;
    return off;
}

/* One past the last byte where a and b differ, given that byte lo differs. */
static size_t last_diff_end(const uint8_t *a, const uint8_t *b, size_t lo,
                            size_t len)
{
    size_t end = len, start;

    while (end - lo >= SPAN_CHUNK &&
           memcmp(a + end - SPAN_CHUNK, b + end - SPAN_CHUNK, SPAN_CHUNK) == 0)
        end -= SPAN_CHUNK;
    start = end - lo >= SPAN_CHUNK ? end - SPAN_CHUNK : lo;
    while (end - start >= SPAN_SUB &&
           memcmp(a + end - SPAN_SUB, b + end - SPAN_SUB, SPAN_SUB) == 0)
        end -= SPAN_SUB;
    while (end > start && a[end - 1] == b[end - 1])
        end--;
    return end;
}

int quorum_diff_span(const uint8_t *a, const uint8_t *b, size_t len,
                     uint64_t span_out[2])
{
    size_t lo;

    if (span_out == NULL || (len > 0 && (a == NULL || b == NULL)))
        return -EINVAL;
    if (len == 0 || a == b)
        return 0;
    lo = first_diff(a, b, len);
    if (lo == len)
        return 0;
    span_out[0] = lo;
    span_out[1] = last_diff_end(a, b, lo, len);
    return 1;
}

/* offset + len must fit in off_t (64-bit, see _FILE_OFFSET_BITS). */
static int range_ok(uint64_t offset, uint64_t len)
{
    return offset <= (uint64_t)INT64_MAX &&
           len <= (uint64_t)INT64_MAX - offset;
}

/* Read exactly len bytes; 0 or an errno.  EOF before len bytes is EIO. */
static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t offset)
{
    size_t done = 0;

    while (done < len) {
        size_t want = len - done < IO_MAX ? len - done : IO_MAX;
        ssize_t n = pread(fd, buf + done, want, (off_t)(offset + done));

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        done += (size_t)n;
    }
    return 0;
}

/* Write exactly len bytes; 0 or an errno.  A write of 0 bytes is EIO. */
static int pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t offset)
{
    size_t done = 0;

    while (done < len) {
        size_t want = len - done < IO_MAX ? len - done : IO_MAX;
        ssize_t n = pwrite(fd, buf + done, want, (off_t)(offset + done));

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO;
        done += (size_t)n;
    }
    return 0;
}

static int datasync(int fd)
{
    while (fdatasync(fd) < 0) {
        if (errno != EINTR)
            return errno;
    }
    return 0;
}

/* A big read goes piece by piece: each child's piece is read, then compared
 * with the first voter's while both are still in the CPU cache.  With many
 * children the whole request no longer fits in the cache, and reading it all
 * before comparing would fetch every byte from memory twice.  If every piece
 * agreed (the common case) the vote is decided; otherwise vote_core groups
 * the full buffers. */
static int pread_vote_pieces(const int fds[], size_t nfds, uint64_t offset,
                             size_t len, uint8_t *const bufs[], int errs_out[],
                             int threshold, int32_t group_out[])
{
    size_t i, off, first = SIZE_MAX, voters = 0;
    int all_equal = 1, failed = 0;

    for (i = 0; i < nfds; i++)
        errs_out[i] = fds[i] < 0 ? -1 : 0;
    for (off = 0; off < len; off += PIECE) {
        size_t n = len - off < PIECE ? len - off : PIECE;

        first = SIZE_MAX;
        for (i = 0; i < nfds; i++) {
            if (errs_out[i] != 0)
                continue;
            errs_out[i] = pread_full(fds[i], bufs[i] + off, n, offset + off);
            if (errs_out[i] != 0) {
                failed = 1; /* earlier pieces were compared with it: regroup */
                continue;
            }
            if (first == SIZE_MAX)
                first = i;
            else if (all_equal && !same_bytes(bufs[first] + off, bufs[i] + off, n))
                all_equal = 0;
        }
    }
    if (!all_equal || failed)
        return vote_core((const uint8_t *const *)bufs, errs_out, nfds, len,
                         threshold, group_out);
    for (i = 0; i < nfds; i++) {
        group_out[i] = errs_out[i] == 0 ? (int32_t)first : -1;
        voters += errs_out[i] == 0;
    }
    if (first == SIZE_MAX || voters < (size_t)threshold)
        return -EIO;
    return (int)first;
}

int quorum_pread_vote(const int fds[], size_t nfds, uint64_t offset,
                      size_t len, uint8_t *const bufs[], int errs_out[],
                      int threshold, int32_t group_out[])
{
    size_t i;

    if (nfds == 0 || nfds > INT32_MAX || threshold < 1 || fds == NULL ||
        bufs == NULL || errs_out == NULL || group_out == NULL ||
        !range_ok(offset, len))
        return -EINVAL;
    for (i = 0; i < nfds; i++) {
        if (fds[i] >= 0 && bufs[i] == NULL)
            return -EINVAL;
    }

    if (len <= PIECE) {
        for (i = 0; i < nfds; i++)
            errs_out[i] = fds[i] < 0 ? -1 : pread_full(fds[i], bufs[i], len, offset);
        return vote_core((const uint8_t *const *)bufs, errs_out, nfds, len,
                         threshold, group_out);
    }
    return pread_vote_pieces(fds, nfds, offset, len, bufs, errs_out, threshold,
                             group_out);
}

/* One preadv2/pwritev2 with RWF_NOWAIT: the whole range from (or into) the
 * page cache at once, or -EAGAIN.  A short transfer counts as "would block":
 * the caller then redoes the request, which is idempotent, the blocking way. */
static int nowait_io(int fd, uint8_t *buf, size_t len, uint64_t offset, int write)
{
#if defined(__linux__) && defined(RWF_NOWAIT)
    struct iovec iov = { buf, len };
    ssize_t n;

    do {
        n = write ? pwritev2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT)
                  : preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return (errno == ENOSYS || errno == EINVAL) ? -EOPNOTSUPP : -errno;
    return (size_t)n == len ? 0 : -EAGAIN;
#else
    (void)fd, (void)buf, (void)len, (void)offset, (void)write;
    return -EOPNOTSUPP;
#endif
}

int quorum_pread_vote_nowait(const int fds[], size_t nfds, uint64_t offset,
                             size_t len, uint8_t *const bufs[], int errs_out[],
                             int threshold, int32_t group_out[])
{
    size_t i;
    int rc;

    if (nfds == 0 || nfds > INT32_MAX || threshold < 1 || fds == NULL ||
        bufs == NULL || errs_out == NULL || group_out == NULL ||
        !range_ok(offset, len))
        return -EINVAL;
    for (i = 0; i < nfds; i++) {
        if (fds[i] >= 0 && bufs[i] == NULL)
            return -EINVAL;
    }
    for (i = 0; i < nfds; i++) {
        if (fds[i] < 0) {
            errs_out[i] = -1;
            continue;
        }
        rc = nowait_io(fds[i], bufs[i], len, offset, 0);
        if (rc == -EAGAIN || rc == -EOPNOTSUPP)
            return rc;
        errs_out[i] = rc < 0 ? -rc : 0;
    }
    return vote_core((const uint8_t *const *)bufs, errs_out, nfds, len,
                     threshold, group_out);
}

int quorum_pwrite_all_nowait(const int fds[], size_t nfds, uint64_t offset,
                             const uint8_t *buf, size_t len, int errs_out[])
{
    size_t i, done = 0;
    int rc, ok = 0;

    if (fds == NULL || errs_out == NULL || (buf == NULL && len > 0) ||
        !range_ok(offset, len))
        return -EINVAL;
    for (i = 0; i < nfds; i++) {
        if (fds[i] < 0) {
            errs_out[i] = -1;
            continue;
        }
        rc = nowait_io(fds[i], (uint8_t *)buf, len, offset, 1);
        if (rc == -EAGAIN || rc == -EOPNOTSUPP) {
            /* Children before this one already hold the data: finish the
             * others the blocking way so every child gets the same bytes. */
            if (done == 0)
                return rc;
            rc = pwrite_full(fds[i], buf, len, offset);
        }
        errs_out[i] = rc < 0 ? -rc : 0;
        ok += rc == 0;
        done++;
    }
    return ok;
}

int quorum_pwrite_all(const int fds[], size_t nfds, uint64_t offset,
                      const uint8_t *buf, size_t len, int sync,
                      int errs_out[])
{
    size_t i;
    int ok = 0;

    if (nfds > INT32_MAX || (nfds > 0 && (fds == NULL || errs_out == NULL)) ||
        (len > 0 && buf == NULL) || !range_ok(offset, len))
        return -EINVAL;

    for (i = 0; i < nfds; i++) {
        int err;

        if (fds[i] < 0) {
            errs_out[i] = -1;
            continue;
        }
        err = pwrite_full(fds[i], buf, len, offset);
        if (err == 0 && sync)
            err = datasync(fds[i]);
        errs_out[i] = err;
        ok += err == 0;
    }
    return ok;
}

#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE) && \
    defined(FALLOC_FL_ZERO_RANGE)
static int falloc(int fd, int mode, uint64_t offset, uint64_t len)
{
    if (len == 0)
        return 1;
    if (!range_ok(offset, len))
        return -EINVAL;
    while (fallocate(fd, mode, (off_t)offset, (off_t)len) < 0) {
        if (errno == EOPNOTSUPP || errno == ENOSYS)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
    return 1;
}

int quorum_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    return falloc(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
}

int quorum_zero_range(int fd, uint64_t offset, uint64_t len)
{
    return falloc(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len);
}
#else
int quorum_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    (void)fd, (void)offset, (void)len;
    return 0;
}

int quorum_zero_range(int fd, uint64_t offset, uint64_t len)
{
    (void)fd, (void)offset, (void)len;
    return 0;
}
#endif

#if defined(__GLIBC__)
#include <malloc.h>
int quorum_tune_malloc(size_t max_buffer)
{
    /* M_MMAP_THRESHOLD is capped by glibc at HEAP_MAX/2 (32 MiB on 64-bit). */
    size_t threshold = max_buffer + 4096;
    if (threshold > ((size_t)32 << 20))
        threshold = (size_t)32 << 20;
    mallopt(M_MMAP_THRESHOLD, (int)threshold);
    mallopt(M_TRIM_THRESHOLD, (int)(4 * threshold));
    return 1;
}
#else
int quorum_tune_malloc(size_t max_buffer)
{
    (void)max_buffer;
    return 0;
}
#endif
