"""Worker processes: more cores for more connections (``serve --workers N``).

The primary (the process the operator started) owns the quorum: every write,
flush, trim and zero, every read that finds a problem, the jobs, QMP and the
state dir.  A worker process serves a share of the NBD connections.  It reads
and votes on the active children itself (the C call of the primary's fast
path) and answers a read only when every active child read OK and agreed.
Every other request (writes, flush, trim, zero, block status, a read that hit
an error or a mismatch) is forwarded to the primary over an NBD connection of
the worker's own (nbd/client.py), and the primary's reply is relayed.

Because only the primary writes, the range lock, the write-intent log, the
resync bitmaps and the event reports need no sharing.  What a worker needs
is the primary's *view*: which children vote (their descriptors), the vote
threshold and the read pattern.  The primary pushes it on every change
(control.py: JSON datagrams with the descriptors attached), and bumps a
shared epoch counter first, synchronously with the change, so a worker that
has not yet received the new view forwards instead of using the old one.

The primary accepts every connection and places it on the least-loaded
process, itself included, ties to itself: one connection never pays for the
forwarding hop.  Modules: control.py (the channel), node.py (the worker's
block node), main.py (the worker process), pool.py (the primary's side).
"""
