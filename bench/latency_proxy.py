"""A loopback TCP proxy that delays every chunk by DELAY ms in each direction (RTT += 2 x DELAY), and counts traffic.

    python bench/latency_proxy.py --target-port 6379 [--delay-ms 1] [--port 0]

It prints ``ready <port>`` once listening, then serves until its stdin closes (or ``--max-seconds`` pass, or it
receives ``quit``). On stdin, ``stats`` prints one JSON line of counters, ``reset`` zeroes them, ``delay MS`` changes the delay:

* ``commands``  - RESP commands sent by clients (a pipeline of 1,000 commands counts 1,000; EVALSHA counts 1)
* ``turns``     - request/response exchanges: a client chunk that arrives after the server has answered since the
                  client's previous chunk. For a synchronous client (redis-py) this is its number of round trips;
                  a pipeline or a MULTI/EXEC block counts once.
* ``connections`` - connections accepted

Why threads: each direction has a reader (stamps each chunk with its due time) and a writer (sleeps until then and
sends), so latency is added without limiting bandwidth, and ``time.sleep`` is finer than asyncio's millisecond
timer. Bounded: at most ``--max-conns`` live connections (more are refused), and a lifetime cap.
"""
from __future__ import annotations

import argparse
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


class RespCounter:
    """Counts RESP commands in a client->server byte stream fed in arbitrary chunks (bulk bodies are skipped)."""

    def __init__(self):
        self.buf = b""
        self.skip = 0        # bytes of a bulk string (+ CRLF) still to skip
        self.args_left = 0   # bulk strings still expected in the current command
        self.commands = 0

    def feed(self, data: bytes) -> None:
        buf, i = self.buf + data, 0
        n = len(buf)
        while i < n:
            if self.skip:
                take = min(self.skip, n - i)
                i += take
                self.skip -= take
                continue
            j = buf.find(b"\r\n", i)
            if j < 0:
                break
            line, i = buf[i:j], j + 2
            try:
                if self.args_left:
                    self.skip = int(line[1:]) + 2  # "$<len>"
                    self.args_left -= 1
                elif line[:1] == b"*":
                    self.args_left = int(line[1:])
                    self.commands += 1
                elif line.strip():  # inline command (redis-cli style)
                    self.commands += 1
            except ValueError:  # not RESP after all: stop counting this connection rather than guess
                self.skip = 1 << 62
        self.buf = buf[i:]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.commands = self.turns = self.connections = 0
        self.up_bytes = self.down_bytes = 0

    def snapshot(self) -> dict:
        with self.lock:
            return {"commands": self.commands, "turns": self.turns, "connections": self.connections,
                    "up_bytes": self.up_bytes, "down_bytes": self.down_bytes}

    def reset(self) -> None:
        with self.lock:
            self.commands = self.turns = self.connections = self.up_bytes = self.down_bytes = 0


class DelayProxy:
    def __init__(self, target_port: int, delay_ms: float, port: int = 0, host: str = "127.0.0.1",
                 max_conns: int = 64):
        self.target = (host, target_port)
        self.delay = delay_ms / 1000.0
        self.max_conns = max_conns
        self.stats = Stats()
        self.live = threading.Semaphore(max_conns)
        self.stopping = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))  # loopback only
        self.sock.listen(64)
        self.sock.settimeout(0.2)  # so the accept loop notices stop()
        self.port = self.sock.getsockname()[1]

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            if not self.live.acquire(blocking=False):
                client.close()  # over the bound: refuse rather than grow
                continue
            threading.Thread(target=self._connection, args=(client,), daemon=True).start()
        self.sock.close()

    def stop(self) -> None:
        self.stopping.set()

    def _connection(self, client: socket.socket) -> None:
        try:
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                return
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.stats.lock:
                self.stats.connections += 1
            state = {"answered": True}  # the server has spoken since the client's last chunk
            counter = RespCounter()
            pipes = [threading.Thread(target=self._pump, args=(client, server, True, state, counter), daemon=True),
                     threading.Thread(target=self._pump, args=(server, client, False, state, None), daemon=True)]
            for t in pipes:
                t.start()
            for t in pipes:
                t.join()
            for s in (client, server):
                s.close()
        finally:
            self.live.release()

    def _pump(self, src, dst, upstream: bool, state: dict, counter) -> None:
        """One direction: a reader stamps chunks with their due time; this thread's writer sends them then."""
        chunks: queue.Queue = queue.Queue()

        def writer():
            while True:
                due, data = chunks.get()
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        w = threading.Thread(target=writer, daemon=True)
        w.start()
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            chunks.put((time.monotonic() + self.delay, data))
            with self.stats.lock:
                if upstream:
                    self.stats.up_bytes += len(data)
                    before = counter.commands
                    counter.feed(data)
                    self.stats.commands += counter.commands - before
                    if state["answered"]:
                        self.stats.turns += 1
                        state["answered"] = False
                else:
                    self.stats.down_bytes += len(data)
                    state["answered"] = True
        chunks.put((0.0, None))
        w.join()


class Proxy:
    """This proxy in its own process (so its threads do not share the benchmark's GIL), driven over its stdin: the
    benchmarks' handle on it (``command("reset")``, :meth:`stats`, :meth:`stop`)."""

    def __init__(self, target_port: int, delay_ms: float):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--target-port", str(target_port),
             "--delay-ms", str(delay_ms), "--max-seconds", "1800"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._readline(10)
        self.port = int(line.split()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def _readline(self, timeout: float) -> str:
        box = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise RuntimeError("latency proxy did not answer")
        return box[0]

    def command(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._readline(10).strip()

    def stats(self) -> dict:
        return json.loads(self.command("stats"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF on stdin ends the proxy
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target-port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=1.0, help="added to each direction (RTT grows by twice this)")
    ap.add_argument("--port", type=int, default=0, help="listening port on 127.0.0.1 (0: any free port)")
    ap.add_argument("--max-conns", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="exit after this long whatever happens")
    args = ap.parse_args(argv)
    proxy = DelayProxy(args.target_port, args.delay_ms, args.port, max_conns=args.max_conns)
    threading.Thread(target=proxy.serve, daemon=True).start()
    print(f"ready {proxy.port}", flush=True)

    def control():
        for line in sys.stdin:  # EOF (the parent closed the pipe or died) ends the proxy
            cmd = line.strip()
            if cmd == "stats":
                print(json.dumps(proxy.stats.snapshot()), flush=True)
            elif cmd == "reset":
                proxy.stats.reset()
                print("ok", flush=True)
            elif cmd.startswith("delay "):  # new one-way delay in ms (used to calibrate the measured RTT)
                proxy.delay = max(0.0, float(cmd.split()[1])) / 1000.0
                print("ok", flush=True)
            elif cmd == "quit":
                break
        proxy.stop()

    threading.Thread(target=control, daemon=True).start()
    proxy.stopping.wait(args.max_seconds)
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
