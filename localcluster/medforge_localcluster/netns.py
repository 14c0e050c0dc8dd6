"""A pod's network namespace in container mode, and the ports it forwards to the host.

`python -m medforge_localcluster.netns PORT...` leaves the host's network namespace for a new
one (the pod's, like a pause container's), brings its loopback up and listens on
127.0.0.1:PORT there for each PORT; every connection is relayed to 127.0.0.1:PORT on the host.
So the pod reaches the API server and the S3 server at the addresses the process pods use,
while what it listens on stays its own: two replicas of one Deployment can bind one port.
It prints "ready" once listening and runs until it is sent SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import signal
import socket
import struct
import sys
import threading

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(listener: socket.socket, port: int, host_ns: int, pod_ns: int) -> None:
    while True:
        conn, _ = listener.accept()
        # A socket belongs to the namespace its thread was in when it was made: make the
        # outgoing one on the host's side, then come back.
        _check(_libc.setns(host_ns, CLONE_NEWNET), "setns host")
        try:
            upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
            upstream.settimeout(None)
        except OSError:
            conn.close()
            continue
        finally:
            _check(_libc.setns(pod_ns, CLONE_NEWNET), "setns pod")
        threading.Thread(target=_pump, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()


def main() -> int:
    ports = [int(p) for p in sys.argv[1:]]
    host_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    _check(_libc.unshare(CLONE_NEWNET), "unshare")
    pod_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
    _loopback_up()
    for port in ports:
        listener = socket.create_server(("127.0.0.1", port), backlog=64)
        threading.Thread(target=_serve, args=(listener, port, host_ns, pod_ns), daemon=True).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
