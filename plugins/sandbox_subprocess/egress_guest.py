"""The guest side of egress: a run's TCP connections, asked of the kernel.

The run's seccomp filter refuses ``socket()`` for every family, so nothing here is what enforces
the tenant's allow-list: the kernel does (``tenantflow.kernel.egress``). This module only makes
ordinary Python reach it: an ``AF_INET``/``AF_INET6`` stream socket is made from a private socket
pair, and its ``connect`` asks the kernel, over the run's egress channel (a SOCK_SEQPACKET socket),
for a connection to ``(host, port)``; the kernel answers with the run's end of a socket pair it
relays to that host (SCM_RIGHTS), which takes the socket's place (``dup2``). Names are resolved by
the kernel: ``getaddrinfo`` answers with the name itself. ``urllib.request``, ``http.client`` and
libraries built on ``socket`` work unchanged, ``ssl`` included (TLS is the run's own: the kernel
relays its bytes); UDP is refused.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
import threading
from typing import Any

_INET = (socket.AF_INET, socket.AF_INET6)
_TYPE_MASK = ~(getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0))
_DEFAULT: Any = vars(socket)["_GLOBAL_DEFAULT_TIMEOUT"]  # create_connection's "no timeout given"
_PEERCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
HINT = "egress goes through the kernel's allow-list proxy"


class _Channel:
    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._lock = threading.Lock()

    def connect(self, host: str, port: int) -> int:
        """A connected stream's fd, or the refusal raised as an OSError the step can read."""
        fds = array.array("i")
        with self._lock:
            self._sock.sendall(json.dumps({"host": host, "port": port}).encode())
            data, ancdata, _flags, _addr = self._sock.recvmsg(65536, socket.CMSG_LEN(fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        reply = json.loads(data or b"{}")
        if reply.get("ok") and len(fds) == 1:
            return int(fds[0])
        for fd in fds:
            os.close(fd)
        message = str(reply.get("error") or "the kernel's egress channel closed")
        if reply.get("refused"):
            raise PermissionError(errno.EACCES, message)
        raise ConnectionRefusedError(errno.ECONNREFUSED, message)


def install(fd: int) -> None:
    """Route this process's IP stream sockets through the kernel's egress channel ``fd``."""
    channel = _Channel(fd)
    cls: Any = socket.socket
    original_init, original_connect, original_setsockopt = cls.__init__, cls.connect, cls.setsockopt
    original_getpeername = cls.getpeername

    def __init__(
        self: Any, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None
    ) -> None:
        if fileno is None:
            family = socket.AF_INET if family == -1 else family
            kind = socket.SOCK_STREAM if type == -1 else type & _TYPE_MASK
            if family in _INET:
                if kind != socket.SOCK_STREAM:
                    raise PermissionError(errno.EPERM, f"only TCP connections are available: {HINT}")
                placeholder, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                other.close()
                fileno, proto = placeholder.detach(), 0
                type = socket.SOCK_STREAM
        original_init(self, family, type, proto, fileno)

    def connect(self: Any, address: Any) -> None:
        if self.family not in _INET:
            original_connect(self, address)
            return None
        host, port = address[0], address[1]
        fd = channel.connect(str(host), int(port))
        timeout = self.gettimeout()
        os.dup2(fd, self.fileno())
        os.close(fd)
        self.settimeout(timeout)  # the new stream's blocking mode, as this socket's
        return None

    def connect_ex(self: Any, address: Any) -> int:
        try:
            connect(self, address)
        except OSError as exc:
            return exc.errno or errno.ECONNREFUSED
        return 0

    def getpeername(self: Any) -> Any:
        if self.family in _INET:
            # The placeholder's pair was made here, a relayed stream's by the kernel. Not connected
            # yet: ssl.SSLContext.wrap_socket must not start a handshake on it.
            made_by, _uid, _gid = _PEERCRED.unpack(
                self.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if made_by == os.getpid():
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
        return original_getpeername(self)

    def setsockopt(self: Any, level: int, option: int, *value: Any) -> None:
        if self.family in _INET and level in (socket.IPPROTO_TCP, socket.IPPROTO_IP, socket.IPPROTO_IPV6):
            return None  # TCP_NODELAY and friends: the kernel's own connection has its defaults
        original_setsockopt(self, level, option, *value)
        return None

    def getaddrinfo(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        if isinstance(host, bytes):
            host = host.decode("idna")
        if host is None:
            raise socket.gaierror(socket.EAI_NONAME, f"no host given ({HINT})")
        number = (
            socket.getservbyname(port) if isinstance(port, str) and not port.isdigit() else int(port or 0)
        )
        six = ":" in host
        return [(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (host, number, 0, 0) if six else (host, number))]  # fmt: skip

    def create_connection(address: Any, timeout: Any = _DEFAULT, source_address: Any = None,
                          **_: Any) -> socket.socket:  # fmt: skip
        sock = socket.socket(
            socket.AF_INET6 if ":" in str(address[0]) else socket.AF_INET, socket.SOCK_STREAM
        )
        try:
            if timeout is not _DEFAULT:
                sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    cls.__init__, cls.connect, cls.connect_ex, cls.setsockopt = __init__, connect, connect_ex, setsockopt
    cls.getpeername = getpeername
    socket.getaddrinfo = getaddrinfo
    socket.create_connection = create_connection
