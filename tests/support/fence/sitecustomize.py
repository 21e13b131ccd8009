"""A fail-closed network fence for a server the tests start (PYTHONPATH=tests/support/fence): names
resolve only when numeric or localhost, and connections go to loopback only. An attempt beyond it is
an OSError inside the server (so its answer shows it), never a packet or a DNS query."""

import ipaddress
import socket

_real_getaddrinfo = socket.getaddrinfo
_real_connect, _real_connect_ex = socket.socket.connect, socket.socket.connect_ex
LOCAL_NAMES = {"localhost", "localhost."}


def _getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name.lower() in LOCAL_NAMES:
        return _real_getaddrinfo("127.0.0.1", port, family, type, proto, socket.AI_NUMERICHOST)
    try:
        return _real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise socket.gaierror(socket.EAI_NONAME, f"the test fence resolves no name ({name})") from None


def _loopback(address) -> bool:
    try:
        return ipaddress.ip_address(address[0].split("%")[0]).is_loopback
    except (ValueError, TypeError, IndexError):
        return False


def _guarded(real):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            raise ConnectionRefusedError(f"the test fence refuses a connection to {address}")
        return real(self, address)
    return connect


socket.getaddrinfo = _getaddrinfo
socket.socket.connect = _guarded(_real_connect)
socket.socket.connect_ex = _guarded(_real_connect_ex)
