"""Garbage in the queue: whatever is RPUSHed straight into ``worker:queue:default`` (random bytes, random text, JSON of
random shapes, near-valid payloads with wrong types, oversized entries, valid jobs), the worker keeps going and
every entry is accounted for: a valid job ran exactly once, anything else is in the failed registry with a reason.

The generator is a seeded ``random.Random`` (``FUZZ_SEED`` to reproduce; the seed is printed), so a failure can be
replayed exactly.
"""
from __future__ import annotations

import inspect
import json
import os
import random
import string

import pytest
import redis

import tests.jobs

MODULES = "worker.sample,tests.jobs,tests.jobs_chaos"
QUEUE = "worker:queue:default"
OUT = "fuzz:out"
MAX_PAYLOAD = 512 * 1024  # the default MAX_PAYLOAD_BYTES
NOT_A_REDIS_VALUE = {"not": ["a", "redis", "value"]}  # push(key, this) raises inside the job


def bytes_client(r) -> redis.Redis:
    """A client on the test Redis without response decoding: entries are bytes in, bytes out."""
    kw = r.connection_pool.connection_kwargs
    return redis.Redis(host=kw["host"], port=kw["port"], db=kw.get("db", 0))


def must_fail(doc: dict) -> bool:
    """True if the payload contract rules this doc out, or it names ``fail`` (the job always raises)."""
    if not (isinstance(doc.get("id"), str) and isinstance(doc.get("name"), str)
            and isinstance(doc.get("args"), list) and isinstance(doc.get("kwargs"), dict)):
        return True
    if not 0 < len(doc["id"]) <= 100:  # an id must name the job (recovery and status records key on it)
        return True
    try:  # Redis's scripts cannot read a lone surrogate: the worker refuses it rather than run a job it can't recover
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    fn = {"push": tests.jobs.push, "fail": tests.jobs.fail}.get(doc["name"])
    if fn is None:
        return True  # not registered (random names never hit a registered one: they start with nope_)
    try:
        inspect.signature(fn).bind(*doc["args"], **doc["kwargs"])
    except TypeError:
        return True
    return doc["name"] == "fail" or NOT_A_REDIS_VALUE in doc["args"]


class Gen:
    """Builds unique queue entries; remembers which must run (valid) and which must fail."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.entries: list = []       # bytes, in push order
        self.must_run: dict = {}      # value pushed by the job -> entry index
        self.must_fail: set = set()   # entry indexes that must end in the failed registry
        self._seen: set = set()
        self._n = 0

    # --- building blocks ---
    def uid(self) -> str:
        self._n += 1
        return f"{self.rng.getrandbits(64):016x}{self._n:08d}"

    def text(self, lo=0, hi=40) -> str:
        alphabet = string.printable + "éß€中😀\u0000\u200b\"\\{}[]"
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(lo, hi)))

    def scalar(self):
        return self.rng.choice([
            None, True, False, self.rng.randint(-2 ** 40, 2 ** 40), self.rng.uniform(-1e6, 1e6), self.text(0, 12),
            0, "", -1, 2 ** 63, 1e300])

    def value(self, depth=0):
        kind = self.rng.random()
        if depth >= 3 or kind < 0.5:
            return self.scalar()
        if kind < 0.75:
            return [self.value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        keys = ["name", "args", "kwargs", "queue", "attempts", "errors", "x", "", "ID", "Id"]
        out = {self.rng.choice(keys + [self.text(1, 8)]): self.value(depth + 1) for _ in range(self.rng.randint(0, 4))}
        out.pop("id", None)  # never a usable id: random shapes are registered under their hash
        return out

    def wrong(self, not_type):
        """A random JSON value that is not of ``not_type``."""
        while True:
            v = self.value(1)
            if not isinstance(v, not_type) or (not_type is int and isinstance(v, bool)):
                return v

    def valid_doc(self, value: str, name="push") -> dict:
        doc = {"id": self.uid(), "name": name, "queue": "default", "args": [OUT, value], "kwargs": {},
               "enqueued_at": 1.7e9 + self.rng.random(), "attempts": 0}
        if name == "fail":
            doc["args"] = [self.text(0, 20)]
        elif self.rng.random() < 0.3:
            doc["args"], doc["kwargs"] = [OUT], {"value": value}
        elif self.rng.random() < 0.2:
            doc["args"], doc["kwargs"] = [], {"key": OUT, "value": value}
        for optional in ("queue", "enqueued_at", "attempts"):
            if self.rng.random() < 0.15:
                del doc[optional]
        if self.rng.random() < 0.1:
            doc["extra"] = self.value(1)
        items = list(doc.items())
        self.rng.shuffle(items)
        return dict(items)

    def dumps(self, doc) -> str:
        return json.dumps(doc, ensure_ascii=self.rng.random() < 0.5, separators=self.rng.choice([None, (",", ":")]))

    def add(self, raw, kind: str) -> bool:
        data = raw.encode("utf-8") if isinstance(raw, str) else raw
        if data in self._seen:
            return False
        self._seen.add(data)
        i = len(self.entries)
        self.entries.append(data)
        if kind == "fail":
            self.must_fail.add(i)
        return True

    # --- entry kinds ---
    def valid(self):
        value = f"v{len(self.entries)}"
        if self.add(self.dumps(self.valid_doc(value)), "run"):
            self.must_run[value] = len(self.entries) - 1

    def random_bytes(self):
        n = self.rng.randint(0, 48)
        self.add(bytes(self.rng.getrandbits(8) for _ in range(n)), "fail")

    def random_text(self):
        self.add(self.text(0, 60), "fail")

    def random_json(self):
        v = self.value()
        # A dict with a string "id" could be a legitimate loose id; random shapes never carry one (see keys above).
        self.add(self.dumps(v), "fail")

    def near_valid(self):
        """A valid doc with 1-3 mutations. Whether it must fail is decided on the final doc (by the payload contract:
        id/name/args/kwargs typed, a registered name, arguments that fit); the rest (odd optional fields, odd
        values) may run or fail, and only has to be accounted for."""
        doc = self.valid_doc(f"n{len(self.entries)}", name=self.rng.choice(["push", "push", "fail"]))
        for _ in range(self.rng.randint(1, 3)):
            m = self.rng.randrange(12)
            if m == 0:
                doc.pop(self.rng.choice(["id", "name", "args", "kwargs"]), None)
            elif m == 1:
                field, kind = self.rng.choice([("id", str), ("name", str), ("args", list), ("kwargs", dict)])
                doc[field] = self.wrong(kind)
            elif m == 2:
                doc["name"] = "nope_" + self.uid()
            elif m == 3 and isinstance(doc.get("args"), list):
                doc["args"] = doc["args"] + [self.value(1)] * self.rng.randint(1, 3)  # too many arguments
            elif m == 4 and isinstance(doc.get("kwargs"), dict):
                doc["kwargs"] = dict(doc["kwargs"], **{"unexpected_" + self.uid(): 1})
            elif m == 5:
                doc["attempts"] = self.wrong(int)
            elif m == 6:
                doc["errors"] = self.wrong(list)
            elif m == 7:
                doc["queue"] = self.wrong(str)
            elif m == 8:
                doc["enqueued_at"] = self.value(1)
            elif m == 9 and doc.get("name") == "push" and isinstance(doc.get("args"), list) and len(doc["args"]) == 2:
                doc["args"][1] = NOT_A_REDIS_VALUE  # the job itself raises (redis DataError)
            elif m == 10:
                doc["id"] = "x" * 101 + self.uid()  # too long to be a registry id: the entry's hash is used
            else:
                raw = self.dumps(doc)
                self.add(raw[:self.rng.randint(0, len(raw) - 1)], "fail")  # truncated: not JSON any more
                return
        self.add(self.dumps(doc), "fail" if must_fail(doc) else "either")

    def oversized(self):
        """Valid jobs over MAX_PAYLOAD_BYTES (ASCII, so bytes == characters), and one exactly at the limit."""
        for extra in (1, 1000, 90_000):
            doc = {"id": self.uid(), "name": "push", "args": [OUT, ""], "kwargs": {}}
            pad = MAX_PAYLOAD + extra - len(json.dumps(doc, separators=(",", ":")))
            doc["args"][1] = "o" * pad
            assert self.add(json.dumps(doc, separators=(",", ":")), "fail")
        doc = {"id": self.uid(), "name": "push", "args": [OUT, "at-limit:"], "kwargs": {}}
        doc["args"][1] += "l" * (MAX_PAYLOAD - len(json.dumps(doc, separators=(",", ":"))))
        raw = json.dumps(doc, separators=(",", ":"))
        assert len(raw) == MAX_PAYLOAD and self.add(raw, "run")
        self.must_run[doc["args"][1]] = len(self.entries) - 1


def generate(seed: int, n: int) -> Gen:
    g = Gen(seed)
    g.oversized()
    kinds = [(g.valid, 25), (g.random_bytes, 10), (g.random_text, 15), (g.random_json, 20), (g.near_valid, 30)]
    makers = [m for m, w in kinds for _ in range(w)]
    while len(g.entries) < n:
        g.rng.choice(makers)()
    return g


def test_fuzzed_queue_entries_are_all_accounted_for(r, spawn):
    seed = int(os.environ.get("FUZZ_SEED", "20261126"))
    n = int(os.environ.get("FUZZ_ENTRIES", "1200"))
    print(f"\nfuzz: seed={seed} entries={n} (FUZZ_SEED / FUZZ_ENTRIES to replay)")
    g = generate(seed, n)
    client = bytes_client(r)
    for i in range(0, len(g.entries), 200):
        client.rpush(QUEUE, *g.entries[i:i + 200])
    assert client.llen(QUEUE) == len(g.entries)

    w = spawn("--burst", JOB_MODULES=MODULES, LOG_LEVEL="WARNING", UNKNOWN_JOB_GRACE="0")
    code = w.wait(120)
    assert code == 0, f"burst worker exited {code} (seed {seed}); last output:\n" + "\n".join(
        line for _, line in w.lines[-30:])

    done = int(client.get("worker:stat:processed") or 0)
    failed = client.zcard("worker:failed")
    assert client.llen(QUEUE) == 0
    assert [k for k in client.keys("worker:processing:*") if client.llen(k)] == []
    assert int(client.get("worker:stat:failed") or 0) == failed, "two failures shared one registry record"
    assert done + failed == len(g.entries), f"done {done} + failed {failed} != {len(g.entries)} entries"

    ran = [v.decode() for v in client.lrange(OUT, 0, -1)]
    for value in g.must_run:
        assert ran.count(value) == 1, f"valid entry #{g.must_run[value]} ran {ran.count(value)} times"
    recs = [json.loads(rec) for rec in client.hvals("worker:failed:data")]
    payloads = {rec["payload"] for rec in recs}
    heads = {rec["payload"] for rec in recs if rec.get("payload_truncated")}  # a huge entry keeps its first 64 KiB
    for i in sorted(g.must_fail):
        try:
            text = g.entries[i].decode("utf-8")
        except UnicodeDecodeError:
            continue  # not text: covered by the totals above
        assert text in payloads or any(text.startswith(h) and len(h) == 64 * 1024 for h in heads), \
            f"entry #{i} {g.entries[i][:120]!r} is neither run nor in the failed registry"
    records = [json.loads(rec) for rec in client.hvals("worker:failed:data")]
    assert all(rec.get("cause") and (rec.get("message") or rec.get("type")) for rec in records), "a reason each"
    print(f"fuzz: {done} ran, {failed} failed ({sum(r_['cause'] == 'bad_payload' for r_ in records)} bad payloads)")


# --- the cases the fuzzer found, pinned down one by one (each is also in the random mix above) ---

def _burst_one(r, spawn, entry: bytes):
    client = bytes_client(r)
    client.rpush(QUEUE, entry)
    w = spawn("--burst", JOB_MODULES=MODULES, UNKNOWN_JOB_GRACE="0")
    code = w.wait(30)
    return code, w, client


@pytest.mark.parametrize("entry", [b"\xff\xfe not utf-8 \x80", b""], ids=["non-utf8", "empty"])
def test_unreadable_entry_goes_to_failed(r, spawn, entry):
    code, w, client = _burst_one(r, spawn, entry)
    assert code == 0, w.output
    assert client.zcard("worker:failed") == 1
    assert [k for k in client.keys("worker:processing:*") if client.llen(k)] == []


@pytest.mark.parametrize("field,value", [("attempts", "x"), ("attempts", [1]), ("errors", 5), ("errors", {"a": 1})])
def test_failing_job_with_wrong_typed_bookkeeping_fields_goes_to_failed(r, spawn, field, value):
    doc = {"id": "wrongtyped" + field, "name": "fail", "args": ["boom"], "kwargs": {}, field: value}
    code, w, client = _burst_one(r, spawn, json.dumps(doc).encode())
    assert code == 0, w.output
    assert client.zcard("worker:failed") == 1 and client.hexists("worker:failed:data", doc["id"])
    assert [k for k in client.keys("worker:processing:*") if client.llen(k)] == []


@pytest.mark.parametrize("entry", [
    b'{"id":"","name":"push","args":["fuzz:out","empty-id"],"kwargs":{}}',
    ('{"id":"%s","name":"push","args":["fuzz:out","long-id"],"kwargs":{}}' % ("i" * 101)).encode(),
    b'{"id":"sur1","name":"push","args":["fuzz:out","lone"],"kwargs":{},"note":"\\udce9"}',
    b'{"id":"sur2","name":"push","args":["fuzz:out","\\uDCE9"],"kwargs":{}}',
    b'{"id":"inf1","name":"push","args":["fuzz:out",1e999],"kwargs":{}}',
], ids=["empty-id", "id-over-100", "lone-surrogate-in-a-field", "lone-surrogate-uppercase-in-args",
        "1e999-issue-27-item-10"])
def test_payload_recovery_could_not_handle_is_refused_not_run(r, spawn, entry):
    """Found by a chaos review: an empty id ran, but recovery keys on the id (a stalled worker could not tell it was
    recovered, and its run overlapped the recovered one); a lone surrogate ran, but Redis's JSON cannot read it, so
    after a crash recovery called it unreadable and failed it instead of putting it back. The worker refuses both
    up front, with the reason, as it refuses any payload it could not recover."""
    code, w, client = _burst_one(r, spawn, entry)
    assert code == 0, w.output
    assert client.llen(OUT) == 0, "the job ran"
    assert client.zcard("worker:failed") == 1, w.output
    (rec,) = [json.loads(v) for v in client.hvals("worker:failed:data")]
    assert rec["cause"] == "bad_payload" and ("'id'" in rec["message"] or "lone surrogate" in rec["message"]
                                              or "infinity is not JSON" in rec["message"]), rec
    assert [k for k in client.keys("worker:processing:*") if client.llen(k)] == []


def test_oversized_counts_bytes_not_characters(r, spawn):
    """MAX_PAYLOAD_BYTES is a size in bytes: a payload of 200,000 '€' (600,000 bytes in UTF-8, 200,000 characters)
    is over the 512 KiB default and must not run."""
    doc = {"id": "multibyte", "name": "push", "args": [OUT, "€" * 200_000], "kwargs": {}}
    raw = json.dumps(doc, ensure_ascii=False).encode("utf-8")
    assert len(raw) > MAX_PAYLOAD > len(raw.decode("utf-8"))
    code, w, client = _burst_one(r, spawn, raw)
    assert code == 0, w.output
    assert client.llen(OUT) == 0, "an oversized payload ran"
    rec = json.loads(client.hget("worker:failed:data", "multibyte") or "{}")
    assert rec.get("cause") == "bad_payload" and "MAX_PAYLOAD_BYTES" in rec.get("message", "")
