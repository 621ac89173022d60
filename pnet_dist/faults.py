"""Fault injection for tests and benchmarks: a TCP proxy on 127.0.0.1 that can take a service away.

`OutageProxy(upstream_port)` listens on a free loopback port and forwards every connection to
the upstream (e.g. the moto S3 server) while its mode is "pass". Switched to "refuse" it resets
every open connection and every new one (an endpoint that is down); "stall" accepts connections
and never answers (a black-holed network: clients wait for their time-outs). Point a client at
`proxy.endpoint` to put it behind the switch; nothing else in the process is affected.
"""
from __future__ import annotations

import socket
import struct
import threading

MODES = ("pass", "refuse", "stall")


class OutageProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, name="outage-proxy", daemon=True).start()

    def set_mode(self, mode: str) -> None:
        """"pass", "refuse" (resets every connection, open or new) or "stall" (answers nothing)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self.mode = mode
            if mode == "refuse":
                for sock in list(self._open):
                    _reset(sock)
                self._open.clear()

    def close(self) -> None:
        self._closed = True
        self.set_mode("refuse")
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "refuse":
                    _reset(client)
                    continue
                self._open.add(client)
            if mode == "pass":
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
        except OSError:
            self._drop(client)
            return
        with self._lock:
            if self.mode != "pass":
                _reset(upstream)
                return
            self._open.add(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.mode != "pass":  # "stall": hold what arrives, answer nothing
                    continue
                dst.sendall(data)
        except OSError:
            pass
        self._drop(src)
        self._drop(dst)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        try:
            sock.close()
        except OSError:
            pass


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a host with nothing listening answers."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
