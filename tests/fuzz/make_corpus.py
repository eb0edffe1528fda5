"""Write the seed corpus (tests/fuzz/corpus/{nbd,qmp}/): small valid and
near-valid conversations the fuzzer mutates.  Run again after a protocol change:

    python -m tests.fuzz.make_corpus

Each seed starts with the cut byte (targets.py: 0 = all at once, 1..16 = that
many bytes per read, +0x80 = through receive_buffer for NBD).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from nbdquorum.nbd import IHAVEOPT, REQUEST_MAGIC, ClientFlag, Cmd, CmdFlag, Opt
from nbdquorum.nbd.constants import META_BASE_ALLOCATION

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
FIXED = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(s: bytes) -> bytes:
    return u32(len(s)) + s


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def req(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
        data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def go(name: bytes = b"disk", *infos: int) -> bytes:
    return opt(Opt.GO, string(name) + u16(len(infos)) + b"".join(u16(i) for i in infos))


def meta(option: int, name: bytes, *queries: bytes) -> bytes:
    return opt(option, string(name) + u32(len(queries)) + b"".join(string(q) for q in queries))


def nbd_seeds() -> list[bytes]:
    hello = u32(FIXED)
    traffic = (req(Cmd.READ, 1, 0, 4096) + req(Cmd.WRITE, 2, 4096, 512, data=b"\xab" * 512)
               + req(Cmd.FLUSH, 3) + req(Cmd.TRIM, 4, 0, 65536, CmdFlag.FUA)
               + req(Cmd.WRITE_ZEROES, 5, 0, 4096, CmdFlag.NO_HOLE)
               + req(Cmd.CACHE, 6, 0, 4096))
    structured = (opt(Opt.STRUCTURED_REPLY)
                  + meta(Opt.SET_META_CONTEXT, b"disk", META_BASE_ALLOCATION.encode()))
    return [
        hello + opt(Opt.EXPORT_NAME, b"disk") + traffic + req(Cmd.DISC, 7),
        hello + go(b"disk", 0, 1, 2, 3) + traffic,
        hello + structured + go(b"disk") + req(Cmd.BLOCK_STATUS, 8, 0, 1 << 20, CmdFlag.REQ_ONE)
        + req(Cmd.READ, 9, 0, 1 << 20, CmdFlag.DF) + req(Cmd.DISC, 10),
        hello + opt(Opt.LIST) + opt(Opt.INFO, string(b"") + u16(0)) + opt(Opt.ABORT),
        hello + meta(Opt.LIST_META_CONTEXT, b"disk", b"base:") + opt(Opt.STARTTLS)
        + opt(11) + opt(0x4242, b"unknown") + go(b"ro")
        + req(Cmd.WRITE, 1, 0, 16, data=bytes(16)),
        hello + go(b"nope") + go(b"") + req(Cmd.READ, 1, (16 << 20) - 512, 1024),
        u32(0) + opt(Opt.GO),  # no FIXED_NEWSTYLE
        hello + struct.pack(">QII", IHAVEOPT, Opt.GO, 0xFFFFFFFF),  # a huge option
        hello + go() + req(Cmd.WRITE, 1, 0, 1 << 20) + b"\x00" * 100,  # a payload cut short
        hello + go() + b"\xde\xad\xbe\xef" * 8,  # a bad request magic
    ]


def qmp_seeds() -> list[bytes]:
    return [
        b'{"execute": "qmp_capabilities"}\n{"execute": "query-version", "id": 1}\r\n',
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n'
        b'{"exec-oob": "query-status", "id": "x"}\n',
        b"{'execute': 'query-block', 'id': [1, {\"a\": null}]}\n",
        b'{"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "c3",'
        b' "filename": "/tmp/\\u00e9\\"x"}, "id": 2.5}\n',
        b'{"execute": 1}\n["not", "an", "object"]\n{"id": 3}\n{"execute": "x", "foo": 0}\n',
        b'{"execute": "a", "arguments": {"k": 1, "k": 2}}\n{"x": NaN}\n{"x": 1e999}\n',
        b'{"execute": "unterminated\n\x1b{"execute": "quit"}\n',
        b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n",
        b'{"execute": "x", "arguments": {"s": "' + b"a" * 5000 + b'"}}\n',
        b"\xff\xfe garbage } ] { \"\\u12\" \n\x00{}",
    ]


def write(kind: str, seeds: list[bytes]) -> None:
    where = CORPUS / kind
    where.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for cut in (0, 3, 0x80 | 7):
            data = bytes([cut]) + seed
            (where / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def main() -> None:
    write("nbd", nbd_seeds())
    write("qmp", qmp_seeds())


if __name__ == "__main__":
    main()
