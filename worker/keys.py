"""Every Redis key the runtime uses is built here, and only here.

Key schema (``P`` is ``KEY_PREFIX``, default ``worker``; ``{KEY_PREFIX}`` with REDIS_CLUSTER; with QUEUE_GROUPS each group
is a key space of its own, ``P`` = ``KEY_PREFIX:<group>`` or ``{KEY_PREFIX:<group>}``: ``Config.group_prefix``)::

    P                       (none)  the prefix itself, passed to the Lua scripts as a key (KEYS[1]): the root
                                    their other keys are derived from. Never read or written.
    P:queues                SET     names of every queue ever enqueued to (for QUEUES=* and status)
    P:queue:<q>             LIST    waiting job payloads (JSON). Enqueue RPUSHes the tail; workers claim from
                                    the head; a job put back after an interruption is LPUSHed to the head.
    P:wake:<q>              LIST    at most one wake-up token; idle workers BLPOP it instead of polling. Every
                                    push to a queue pushes a token; a claim that leaves work behind pushes one on.
    P:processing:<w>        LIST    the job worker <w> has claimed and not yet acknowledged. A job is moved here
                                    from its queue in the same atomic script that claims it and leaves only in
                                    the script that records its outcome: it always exists in Redis somewhere.
    P:workers               ZSET    worker name -> its deadline (ms, Redis clock): last beat + its own
                                    HEARTBEAT_TTL. A member past it is late; once it has stayed late (the same
                                    score) for its grace (its interval + 1 s) since a live worker first saw it
                                    late, it is dead and its processing list is requeued by whoever notices.
    P:recovered:<w>         SET     ids of the jobs recovered from dead worker <w> ('' alone: it held none), written by
                                    recover.lua, kept 24 h. A worker presumed dead that was not (it stalled) finds
                                    it at its next beat: it kills its runs of those jobs, which run elsewhere now,
                                    and registers again (which deletes it)
    P:cancel:<w>            SET     ids of the jobs worker <w> is asked to stop (cancel(running=True), cancel.lua);
                                    CYCLE pops them at the worker's next beat; kept a day
    P:suspects              HASH    late worker -> "<its score>@<ms when first seen late>" (recover.lua); an entry
                                    whose score no longer matches (the worker beat again, or left) is dropped
    P:worker:<w>            HASH    what status shows: host, pid, dyno, queues, concurrency, state, seen (last
                                    beat, ms), ttl and interval (ms), started, and per busy slot s: job:<s> (payload),
                                    started:<s> (ms), ckpt:<s> (its last checkpoint, saved at heartbeats)
    P:job:<id>              HASH    a job's status record (get_job): status queued|scheduled|running|done|failed,
                                    name, queue, enqueued_at, started_at, ended_at (ms), attempts, worker, result
                                    (JSON). Written at enqueue, claim and outcome; expires RESULT_TTL after the
                                    job is done (FAILED_TTL after it failed); a failure's error is its failed
                                    record. No expiry before its outcome, except a year set by Job.wait
                                    (await.lua): the mark that makes the outcome push to P:done:<id>
    P:done:<id>             LIST    job <id>'s final record ("<status>\n<result or failure JSON>"), pushed by the
                                    script that records its outcome only when someone waits for it (its record had
                                    an expiry: await.lua's mark); expires after 60 s
    P:scheduled             ZSET    payload -> due time (ms). Retries with backoff and enqueue_in/enqueue_at.
    P:failed                ZSET    job id -> time of failure (ms); bounded by FAILED_MAX and FAILED_TTL
    P:failed:data           HASH    job id -> failure record (JSON: payload, cause, type, message, traceback...)
    P:enq:<id>              STRING  dedupe marker of one enqueue call (<id>: its first job's id), so a call redis-py
                                    re-sends after a timeout enqueues nothing twice; expires after 60 s or
                                    10 x REDIS_TIMEOUT
    P:paused                SET     queue names paused through `python -m worker pause` (`*` pauses all)
    P:sched:<name>          HASH    periodic job <name>: tick (highest tick claimed, ms), last/next tick, spec, queue,
                                    run (the id of the last tick's run); expires 2 intervals (or 2 x misfire_grace)
                                    + 60 s after a worker last wrote it; no expiry while a unique schedule's run
                                    has not ended (its status record says queued or scheduled)
    P:unique:<key>          STRING  unique_until="start": the id of the job of <key> (us:<name>:<hash>) that waits
                                    to start (enqueue.lua SETs it); deleted by the claim that takes that job, taken
                                    back by its put-back, retry or recovery if free; counts only while the job it
                                    names has a record saying queued or scheduled. No expiry
    P:schedules             ZSET    periodic job names -> last written (ms), for status; pruned after 30 days
    P:epoch                 STRING  a random id, set by the first worker to register (SET NX) and never deleted
                                    by the runtime. A worker remembers it; if, at a call of its (checked before
                                    the first write; see cycle.lua for the one skip), it is gone or another,
                                    Redis lost its data since (a restart without persistence, a stale replica
                                    promoted): the worker registers again and puts the claims of the jobs it holds
                                    back into its processing list, so they stay recoverable and can be put back
    P:running:<name>        HASH    job <name>'s runs under @job(concurrency=N) (issue 25): '<slot>:<worker>' -> job
                                    id, written by the claim (cycle.lua), deleted by the script that records the
                                    run's outcome or by recovery; entries of workers gone from P:workers (and of
                                    the claiming worker's free slots) are dropped when the limit is reached
    P:held:<name>           LIST    jobs of <name> claimed while its concurrency was at its limit: '<queue>\n<payload>',
                                    oldest first; each recorded end of a run of <name> moves held ones (as many as
                                    the limit has room for) back to the head of their queues (get_job: queued)
    P:rate:<name>           HASH    job <name>'s @job(rate=) bucket (GCRA on Redis's clock): tat (ms) and
                                    tok:<id> -> ms, a token reserved by a job parked in P:scheduled until then;
                                    expires a period after its last token
    P:group:<gid>           HASH    a group (issue 25 item 4, worker/jobgroups.py): total, pending, done, failed,
                                    canceled, created/fired (ms), the callback's payload/id/name/queue (cb*), the
                                    chunks written (c<k>). Its members' ends are counted in the script calls that
                                    record them (prelude group_end); the last one queues the callback. No expiry
                                    until the callback ends, then as the callback's status record (group_close)
    P:group_ids:<gid>       LIST    the group's member ids, in member order (same expiry)
    P:group_res:<gid>       HASH    member id -> "<status>\n<result JSON or failure record>", written once per member
                                    as it ends (HSETNX); read by the callback's run for its results= (same expiry)
    P:stat:processed        STRING  counter of jobs done
    P:stat:failed           STRING  counter of jobs recorded as failed
    P:stat:minute:<m>       STRING  "processed failed" counters as sampled in unix minute <m> (housekeep.lua, SET NX,
                                    for the dashboard's rates); expires after SAMPLE_TTL_S (worker/api.py)
    P:metrics:<n>           STRING  the name of the worker that logs metrics interval <n> (floor(Redis ms /
                                    METRICS_INTERVAL ms)): SET NX by stats.lua, expires after two intervals

The Lua scripts (``worker/lua/*.lua``) receive the prefix ``P`` itself as a key (KEYS[1]; schedule.lua derives it
from ``P:schedules``) and build the keys above whose suffix comes from data the same way (``P:queue:<q>``,
``P:wake:<q>``, ``P:job:<id>``, ``P:processing:<w>``, ``P:worker:<w>``, ``P:recovered:<w>``, ``P:sched:<name>``,
``P:running:<name>``, ``P:held:<name>``, ``P:rate:<name>``,
``P:metrics:<n>``, ``P:stat:minute:<m>``: a job's queue is only known once its payload is read): every key a script
touches is passed in KEYS or derived from one key passed in KEYS, as Redis Cluster needs (each header says which).
Worker names are ``<$DYNO or host>:<pid>``; they may contain ``:``, which is fine inside a key suffix.
"""
from __future__ import annotations


class Keys:
    """Key builder for one prefix. Cheap to construct; holds only strings."""

    __slots__ = ("prefix", "queues", "workers", "scheduled", "failed", "failed_data", "paused",
                 "processed", "failed_count", "suspects", "epoch", "schedules")

    def __init__(self, prefix: str = "worker"):
        self.prefix = prefix
        self.queues = f"{prefix}:queues"
        self.workers = f"{prefix}:workers"
        self.scheduled = f"{prefix}:scheduled"
        self.failed = f"{prefix}:failed"
        self.failed_data = f"{prefix}:failed:data"
        self.paused = f"{prefix}:paused"
        self.processed = f"{prefix}:stat:processed"
        self.failed_count = f"{prefix}:stat:failed"
        self.suspects = f"{prefix}:suspects"
        self.epoch = f"{prefix}:epoch"
        self.schedules = f"{prefix}:schedules"

    def queue(self, name: str) -> str:
        return f"{self.prefix}:queue:{name}"

    def wake(self, name: str) -> str:
        return f"{self.prefix}:wake:{name}"

    def enqueued(self, dedupe_id: str) -> str:
        return f"{self.prefix}:enq:{dedupe_id}"

    def processing(self, worker: str) -> str:
        return f"{self.prefix}:processing:{worker}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def worker(self, worker: str) -> str:
        return f"{self.prefix}:worker:{worker}"

    def cancel(self, worker: str) -> str:
        return f"{self.prefix}:cancel:{worker}"

    def recovered(self, worker: str) -> str:
        return f"{self.prefix}:recovered:{worker}"

    def running(self, name: str) -> str:
        return f"{self.prefix}:running:{name}"

    def held(self, name: str) -> str:
        return f"{self.prefix}:held:{name}"

    def rate(self, name: str) -> str:
        return f"{self.prefix}:rate:{name}"

    def sched(self, name: str) -> str:
        return f"{self.prefix}:sched:{name}"

    def unique(self, key: str) -> str:
        return f"{self.prefix}:unique:{key}"

    def stat_minute(self, minute: int) -> str:
        return f"{self.prefix}:stat:minute:{minute}"

    def metrics(self, index: int) -> str:
        return f"{self.prefix}:metrics:{index}"

    def group(self, gid: str) -> str:
        return f"{self.prefix}:group:{gid}"

    def group_ids(self, gid: str) -> str:
        return f"{self.prefix}:group_ids:{gid}"

    def group_res(self, gid: str) -> str:
        return f"{self.prefix}:group_res:{gid}"
