"""RQ's side of the throughput benchmark: RQ imports jobs by dotted path (``rq_jobs.noop``; bench/ is on its path)."""


def noop():
    """Does nothing, like ``worker.sample.noop``: the benchmark measures the runtime, not the job."""
