# Type stub for the module that nbdquorum/_native_build.py compiles with cffi
# (out-of-line API mode).  Only nbdquorum/native.py imports it; the stub
# covers just what that module uses.  The lib signatures mirror
# native/quorum.cdef; pointers and arrays are cffi cdata objects.

from typing import Any

class _CData:
    def __getitem__(self, index: int) -> Any: ...
    def __setitem__(self, index: int, value: Any) -> None: ...
    def __len__(self) -> int: ...

class _FFI:
    NULL: _CData
    def new(self, cdecl: str, init: Any = ...) -> _CData: ...
    def from_buffer(
        self, cdecl: str, python_buffer: Any, require_writable: bool = ...
    ) -> _CData: ...
    def unpack(self, cdata: _CData, length: int) -> list[Any]: ...

class _Lib:
    def quorum_vote(
        self, bufs: _CData, nbufs: int, len: int, threshold: int, group_out: _CData
    ) -> int: ...
    def quorum_diff_span(self, a: _CData, b: _CData, len: int, span_out: _CData) -> int: ...
    def quorum_pread_vote(
        self,
        fds: _CData,
        nfds: int,
        offset: int,
        len: int,
        bufs: _CData,
        errs_out: _CData,
        threshold: int,
        group_out: _CData,
    ) -> int: ...
    def quorum_pwrite_all(
        self,
        fds: _CData,
        nfds: int,
        offset: int,
        buf: _CData,
        len: int,
        sync: int,
        errs_out: _CData,
    ) -> int: ...
    def quorum_punch_hole(self, fd: int, offset: int, len: int) -> int: ...
    def quorum_zero_range(self, fd: int, offset: int, len: int) -> int: ...
    def quorum_tune_malloc(self, max_buffer: int) -> int: ...
    def quorum_pread_vote_nowait(
        self,
        fds: _CData,
        nfds: int,
        offset: int,
        len: int,
        bufs: _CData,
        errs_out: _CData,
        threshold: int,
        group_out: _CData,
    ) -> int: ...
    def quorum_pwrite_all_nowait(
        self, fds: _CData, nfds: int, offset: int, buf: _CData, len: int, errs_out: _CData
    ) -> int: ...

ffi: _FFI
lib: _Lib
