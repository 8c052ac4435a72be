"""A minimal QEMU guest agent client for the lab scripts (the Rust tools have the real one).

Every connection starts as the real agent needs (docs/lab.md#the-agent-on-the-wire): byte
0xFF, then guest-sync-delimited with a random id; replies up to ours are skipped.
"""

import base64
import json
import random
import socket
import time


class AgentError(Exception):
    pass


class Agent:
    """`vsock_port`: `path` is a hybrid vsock device's socket and the agent listens on that
    guest port (`CONNECT <port>`, answered `OK <n>`; docs/lab.md#hybrid-vsock)."""

    def __init__(self, path, timeout=10.0, vsock_port=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        if vsock_port is not None:
            self.sock.sendall(f"CONNECT {vsock_port}\n".encode())
            reply = b""
            while not reply.endswith(b"\n"):
                byte = self.sock.recv(1)
                if not byte or len(reply) > 64:
                    self.close()
                    raise AgentError(f"{path} did not open guest port {vsock_port}: {reply!r}")
                reply += byte
            if not reply.startswith(b"OK "):
                self.close()
                raise AgentError(f"{path} answered CONNECT {vsock_port} with {reply!r}")
        ident = random.randrange(1, 2**31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": ident}}, prefix=b"\xff")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._read()
            if msg.get("return") == ident:
                return
        raise AgentError("no reply to guest-sync-delimited")

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, msg, prefix=b""):
        self.sock.sendall(prefix + json.dumps(msg).encode() + b"\n")

    def _read(self):
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                line = line.lstrip(b"\xff").strip()
                try:
                    return json.loads(line)
                except ValueError:
                    continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AgentError("the agent closed the connection")
            self.buf += chunk

    def execute(self, command, arguments=None):
        msg = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        self._send(msg)
        reply = self._read()
        if "error" in reply:
            raise AgentError(f"{command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def exec(self, argv, timeout=30.0):
        """Runs argv in the guest; returns (exitcode, stdout, stderr)."""
        pid = self.execute("guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status["exited"]:
                out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                return status.get("exitcode", -1), out, err
            time.sleep(0.02)
        raise AgentError(f"{argv[0]} did not finish within {timeout} s")

    def upload(self, data, remote, mode="755"):
        """Writes bytes to a file in the guest (guest-file-*), then chmods it."""
        handle = self.execute("guest-file-open", {"path": remote, "mode": "w"})
        try:
            for i in range(0, len(data), 48 * 1024):
                chunk = base64.b64encode(data[i:i + 48 * 1024]).decode()
                self.execute("guest-file-write", {"handle": handle, "buf-b64": chunk})
        finally:
            self.execute("guest-file-close", {"handle": handle})
        self.exec(["/bin/chmod", mode, remote])

    def sh(self, script, timeout=30.0):
        """Runs a busybox sh script in the guest; its stdout, or AgentError on failure."""
        code, out, err = self.exec(["/bin/sh", "-c", script], timeout)
        if code != 0:
            raise AgentError(f"guest `{script}` exited {code}: {err.strip()}")
        return out


def ping(path, timeout, vsock_port=None):
    """True when the agent answers guest-ping."""
    try:
        with Agent(path, timeout, vsock_port) as agent:
            return agent.execute("guest-ping") == {}
    except (OSError, AgentError, ValueError):
        return False
