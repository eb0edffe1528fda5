"""sockets.bind_unix / bind_tcp: never over a live server, files removed only when ours."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from nbdquorum.sockets import bind_tcp, bind_unix, socket_alive
from tests.ci import unavailable


def test_binds_and_removes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    li = bind_unix(str(path))
    assert li.address == f"unix:{path}"
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert socket_alive(str(path))
    li.close()
    assert not path.exists()


def test_refuses_a_live_socket_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = bind_unix(str(path))
    try:
        with pytest.raises(OSError) as info:
            bind_unix(str(path))
        assert info.value.errno == errno.EADDRINUSE
        assert str(path) in str(info.value.strerror)
        assert socket_alive(str(path)), "the first server's socket was taken over"
    finally:
        first.close()


def test_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crash leaves
    li = bind_unix(str(path))
    try:
        assert socket_alive(str(path))
    finally:
        li.close()


def test_never_touches_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(OSError, match="not a socket") as info:
        bind_unix(str(path))
    assert str(path) in str(info.value.strerror)
    assert path.read_text() == "data"


def test_keeps_a_successors_file(tmp_path: Path) -> None:
    """A listener closed late must not unlink the socket a new server bound since."""
    path = tmp_path / "s.sock"
    old = bind_unix(str(path))
    os.unlink(path)  # an operator (or a crash cleanup) removed it; a successor binds
    new = bind_unix(str(path))
    old.close()
    assert socket_alive(str(path))
    new.close()
    assert not path.exists()


def test_mode_is_applied_before_the_name_appears(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    li = bind_unix(str(path), mode=0o600)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    finally:
        li.close()


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nodir" / "s.sock"
    with pytest.raises(OSError) as info:
        bind_unix(str(path))
    assert info.value.errno == errno.ENOENT
    assert str(path) in str(info.value.strerror)


def test_tcp_port_in_use_names_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError) as info:
            bind_tcp("127.0.0.1", port)
    assert info.value.errno == errno.EADDRINUSE
    assert f"tcp:127.0.0.1:{port}" in str(info.value.strerror)


def test_tcp_unresolvable_host_names_the_address() -> None:
    with pytest.raises(OSError) as info:
        bind_tcp("no-such-host.invalid", 10809)
    assert "tcp:no-such-host.invalid:10809" in str(info.value.strerror)


@pytest.mark.parametrize("long_name", [False, True])
def test_mode_and_group_are_set_before_the_path_exists(tmp_path: Path, long_name: bool) -> None:
    import grp

    other = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if other is None or (os.getuid() != 0 and other not in os.getgroups()):
        unavailable("no other group this process may give a file")
    # a path too long for the temporary name: bound in place (umask, then chown/chmod)
    name = "s" * (100 - len(str(tmp_path))) if long_name else "s.sock"
    path = tmp_path / name
    li = bind_unix(str(path), mode=0o640, group=other)
    try:
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == other
        assert not [p for p in tmp_path.iterdir() if p.name.endswith("~")]
    finally:
        li.close()
    assert not path.exists()


def test_not_activated_without_listen_fds() -> None:
    from nbdquorum.sockets import inherited

    env = {"PATH": "/bin"}
    assert inherited(env) is None
    assert env == {"PATH": "/bin"}


def test_listen_fds_meant_for_another_process_are_ignored_and_cleared() -> None:
    """A parent's LISTEN_* inherited by accident: not ours (LISTEN_PID), never used,
    and gone from the environment so no child of ours takes them either."""
    from nbdquorum.sockets import inherited

    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "nbd",
           "PATH": "/bin"}
    assert inherited(env) is None
    assert env == {"PATH": "/bin"}


def test_activation_takes_the_listening_socket_and_refuses_a_connected_one() -> None:
    """In a child process, so that descriptor 3 is the one handed over."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, socket, sys
        from nbdquorum.sockets import inherited
        kind = sys.argv[1]
        if kind == "listening":
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            s.listen()
        else:
            s, _peer = socket.socketpair()
        os.dup2(s.fileno(), 3)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
        try:
            found = inherited(env)
        except OSError as err:
            print("error", err.strerror)
        else:
            assert found is not None and env == {}
            li, = found
            print(li.address, li.path, li.listening, os.get_inheritable(3))
            li.close()
    """)
    out = {}
    for kind in ("listening", "connected"):
        proc = subprocess.run([sys.executable, "-c", code, kind], capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        out[kind] = proc.stdout.strip()
    assert out["listening"].startswith("tcp:127.0.0.1:"), out
    assert out["listening"].endswith("(systemd: web) None True False"), out
    assert out["connected"].startswith("error socket activation: descriptor 3 is not a "
                                       "listening stream socket"), out
