#!/usr/bin/env python3
"""Resident memory of a running oauth-manager per open keep-alive connection.

Usage: python3 examples/connection_memory.py PID PORT N [PATH]

Opens N connections to 127.0.0.1:PORT, sends one `GET PATH` (default /healthz) on each, reads
the answers, keeps all of them open, and prints the process's VmRSS before and after (from
/proc/PID/status). Raise `ulimit -n` above N first. BENCHMARKS.md, session 7, records a run
against `oauth-manager dev`.
"""
import socket
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for process {pid}")


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    pid, port, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "/healthz"
    before = rss_kib(pid)
    connections = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        connections.append(connection)
    for connection in connections:
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(65536)
            if not chunk:
                raise SystemExit("a connection closed before answering")
            answer += chunk
    time.sleep(1)
    after = rss_kib(pid)
    print(
        f"{count} connections: VmRSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
        f"{(after - before) / count:.1f} KiB per connection"
    )


if __name__ == "__main__":
    main()
