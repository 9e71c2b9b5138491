"""HTML of each page, built from the read model's documents (worker/api.py). Every value goes through :func:`h`
(html.escape, quotes included) or :func:`quote` (URL parts); nothing from Redis is ever markup. Each page returns
``(title, body_html, live_values)``: the live values are what the page's JSON twin (``?live=1``) returns for
dashboard.js to refresh in place (as text)."""
from __future__ import annotations

import html
import json
from typing import NamedTuple
from urllib.parse import quote as _quote, urlencode

from ..api import duration, iso as _iso

CSRF_SLOT = "\x00csrf\x00"  # replaced by the request's token when the page is sent


class Ctx(NamedTuple):
    root: str
    csrf: str
    read_only: bool


def h(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def quote(value) -> str:
    return _quote(str(value), safe="")


def iso(t) -> str:
    return _iso(t) or "-"


def p(text) -> str:
    return f"<p>{h(text)}</p>"


def dur(s) -> str:
    return "-" if s is None else duration(s)


def js(value) -> str:
    """A JSON value as escaped text (arguments, results, checkpoints)."""
    try:
        return h(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):
        return h(repr(value))


def table(headers, rows, num=()) -> str:
    head = "".join(f'<th class="num">{c}</th>' if i in num else f"<th>{c}</th>" for i, c in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def button(ctx: Ctx, action: str, label: str, fields: dict, danger=False, confirm=None) -> str:
    """A one-button POST form (hidden in read-only mode)."""
    if ctx.read_only:
        return ""
    hidden = "".join(f'<input type="hidden" name="{h(k)}" value="{h(v)}">' for k, v in fields.items())
    conf = f' data-confirm="{h(confirm)}"' if confirm else ""
    cls = ' class="danger"' if danger else ""
    return (f'<form class="inline" method="post" action="{h(ctx.root + action)}"{conf}>'
            f'<input type="hidden" name="csrf" value="{CSRF_SLOT}">{hidden}<button type="submit"{cls}>{h(label)}'
            f"</button></form>")


def skipped(doc) -> str:
    items = doc.get("skipped") or []
    if not items:
        return ""
    return '<div class="skipped">Skipped (unreadable records): <ul>' + "".join(
        f"<li>{h(x)}</li>" for x in items[:20]) + "</ul></div>"


def pager(ctx: Ctx, path: str, doc: dict, extra: dict = None) -> str:
    page, pages = doc["page"], doc["pages"]
    if pages <= 1:
        return ""
    q = dict(extra or {})

    def link(n, label):
        return f'<a href="{h(ctx.root + path + "?" + urlencode(dict(q, page=n)))}">{h(label)}</a>'
    parts = [link(1, "« first")] if page > 1 else []
    parts += [link(page - 1, "‹ prev")] if page > 1 else []
    parts.append(f"<span>page {page} of {pages}</span>")
    parts += [link(page + 1, "next ›"), link(pages, "last »")] if page < pages else []
    return f'<p class="pager">{"".join(parts)}</p>'


def job_link(ctx: Ctx, job_id, label=None) -> str:
    if not job_id:
        return h(label or "-")
    return f'<a href="{h(ctx.root)}/jobs/{h(quote(job_id))}">{h(label or job_id)}</a>'


def counts(r, cfg) -> tuple:
    """(failed, scheduled, now) for the header: one round trip."""
    from ..client import for_space
    from ..keys import Keys
    f, s, now = 0, 0, 0.0
    for space in cfg.spaces():  # QUEUE_GROUPS: summed over every group's key space (one round trip each)
        k = Keys(space.key_prefix)
        with for_space(r, space.key_prefix).pipeline(transaction=False) as pipe:
            pipe.zcard(k.failed).zcard(k.scheduled).time()
            f1, s1, (sec, usec) = pipe.execute(raise_on_error=False)
        f = f + f1 if isinstance(f, int) and isinstance(f1, int) else "?"
        s = s + s1 if isinstance(s, int) and isinstance(s1, int) else "?"
        now = max(now, int(sec) + int(usec) / 1e6)
    return f, s, now


# --- pages ------------------------------------------------------------------------------------------------

def _chart(points) -> str:
    """The last hour's throughput as an SVG bar chart (processed up, failed down in red)."""
    bar, top = 8, 80
    w = bar * len(points)
    peak = max([1] + [(pt["processed"] or 0) + (pt["failed"] or 0) for pt in points])
    rects = []
    for i, pt in enumerate(points):
        pr, fa = pt["processed"] or 0, pt["failed"] or 0
        hp, hf = round(top * pr / peak), round(top * fa / peak)
        title = f"{iso(pt['minute'])[11:16]} UTC: {pt['processed'] if pt['processed'] is not None else '?'} done, " \
                f"{pt['failed'] if pt['failed'] is not None else '?'} failed"
        rects.append(f'<g><title>{h(title)}</title><rect class="p" x="{i * bar}" y="{top - hp - hf}" '
                     f'width="{bar - 1}" height="{hp}"/><rect class="f" x="{i * bar}" y="{top - hf}" '
                     f'width="{bar - 1}" height="{hf}"/></g>')
    total = sum(pt["processed"] or 0 for pt in points)
    return (f'<svg class="chart" width="{w}" height="{top + 2}" viewBox="0 0 {w} {top + 2}" role="img" '
            f'aria-label="jobs per minute, last hour">{"".join(rects)}</svg>'
            f"<p>{total} done in the last hour (peak {peak}/min); minutes nobody sampled show nothing.</p>")


def overview(ctx: Ctx, doc: dict):
    t = doc["totals"]
    busy = sum(len(w["slots"]) for w in doc["workers"] if w["state"] != "dead")
    slots = sum(w["concurrency"] for w in doc["workers"] if w["state"] != "dead")
    live = {"processed": t["processed"], "failed_total": t["failed"], "failed": doc["failed"],
            "scheduled": doc["scheduled"], "busy": f"{busy}/{slots}", "time": iso(doc["time"]),
            "workers": len(doc["workers"])}
    cards = "".join(f'<div class="card">{h(label)}<b data-live="{key}">{h(live[key])}</b></div>' for key, label in (
        ("processed", "processed"), ("failed_total", "failed (all time)"), ("failed", "in failed registry"),
        ("scheduled", "scheduled"), ("workers", "workers"), ("busy", "busy slots")))
    rows = []
    for q in doc["queues"]:
        name = q["name"]
        live[f"q:{name}:depth"] = "?" if q["depth"] is None else q["depth"]
        live[f"q:{name}:latency"] = "-" if not q["depth"] else dur(q["latency"])
        live[f"q:{name}:paused"] = "paused" if q["paused"] else "running"
        act = button(ctx, f"/queues/{quote(name)}/{'resume' if q['paused'] else 'pause'}",
                     "Resume" if q["paused"] else "Pause", {"back": "/"})
        group = f' <small>({h(q["group"])})</small>' if q.get("group") else ""  # QUEUE_GROUPS: its group
        rows.append((f'<a href="{h(ctx.root)}/queues/{h(quote(name))}">{h(name)}</a>' + group,
                     f'<span data-live="q:{h(name)}:depth">{h(live[f"q:{name}:depth"])}</span>',
                     f'<span data-live="q:{h(name)}:latency">{h(live[f"q:{name}:latency"])}</span>',
                     f'<span class="{"paused" if q["paused"] else ""}" data-live="q:{h(name)}:paused">'
                     f'{h(live[f"q:{name}:paused"])}</span>', act))
    body = [f'<div class="cards">{cards}</div>', skipped(doc), "<h2>Throughput (last hour)</h2>",
            _chart(doc["throughput"]), "<h2>Queues</h2>",
            table(("Queue", "Waiting", "Latency", "State", ""), rows, num=(1, 2)) if rows else p("No queues yet.")]
    wrows = []
    for w in doc["workers"]:
        for n, sl in enumerate(w["slots"] or [{}]):
            j = sl.get("job") or {}
            head = (h(w["name"]), h(w["dyno"] or "-"), f'<span class="{h(w["state"])}">{h(w["state"])}</span>',
                    f'{len(w["slots"])}/{w["concurrency"]}', h(",".join(w["queues"]) or "-"),
                    h(dur(w["heartbeat_age"]))) if n == 0 else ("", "", "", "", "", "")
            wrows.append((*head, h(sl.get("slot", "")) if sl else "",
                          job_link(ctx, j.get("id"), j.get("name")) if j else "-",
                          h(dur(j.get("running_for"))) if j else "-",
                          f'<code>{js(sl.get("checkpoint"))}</code>' if sl.get("checkpoint") is not None else "-"))
    body += ["<h2>Workers</h2>", table(("Worker", "Dyno", "State", "Slots", "Queues", "Heartbeat", "Slot", "Job",
                                        "Running", "Checkpoint"), wrows, num=(5, 8)) if wrows else p("No workers.")]
    return "Overview", "".join(body), live


def queue(ctx: Ctx, doc: dict):
    name = doc["name"]
    live = {"depth": doc["depth"], "latency": "-" if not doc["depth"] else dur(doc["latency"])}
    state = "paused" if doc["paused"] else "running"
    act = button(ctx, f"/queues/{quote(name)}/{'resume' if doc['paused'] else 'pause'}",
                 "Resume queue" if doc["paused"] else "Pause queue", {"back": f"/queues/{quote(name)}"})
    head = (f'<p><span data-live="depth">{h(doc["depth"])}</span> waiting, oldest waited '
            f'<span data-live="latency">{h(live["latency"])}</span>; state: <span class="{state}">{state}</span> '
            f"{act}</p>")
    rows = []
    for j in doc["jobs"]:
        delete = button(ctx, f"/queues/{quote(name)}/delete", "Delete",
                        {"payload": j["raw_payload"], "back": f"/queues/{quote(name)}?page={doc['page']}"},
                        danger=True, confirm="Delete this waiting job?")
        if j["junk"]:
            rows.append((j["position"], "-", "<em>not a job</em>", f"<code>{h(j['raw'])}</code>", "-", delete))
        else:
            rows.append((j["position"], job_link(ctx, j["id"]), h(j["name"]),
                         f"<code>{js(j['args'])}</code>" + (f" <code>{js(j['kwargs'])}</code>" if j["kwargs"] else ""),
                         h(iso(j["enqueued_at"])), delete))
    body = head + skipped(doc) + pager(ctx, f"/queues/{quote(name)}", doc) + (
        table(("#", "Id", "Name", "Arguments", "Enqueued (UTC)", ""), rows, num=(0,)) if rows else p("Empty."))
    return f"Queue {name}", body + pager(ctx, f"/queues/{quote(name)}", doc), live


def job(ctx: Ctx, job_id: str, doc):
    if doc is None:
        return (f"Job {job_id}", p(f"No job {job_id!r}: unknown, or its record expired (RESULT_TTL after it was "
                                   f"done, FAILED_TTL after it failed)."), {})
    st = doc["status"]
    rows = [("Status", f'<span class="{h(st)}" data-live="status">{h(st)}</span>'), ("Name", h(doc["name"])),
            ("Queue", f'<a href="{h(ctx.root)}/queues/{h(quote(doc["queue"] or ""))}">{h(doc["queue"])}</a>'
             if doc.get("queue") else "-"),
            ("Arguments", f"<code>{js(doc.get('args'))}</code>" if doc.get("payload_found") else
             "<em>not readable now (the payload is only kept while the job waits, runs or has failed)</em>"),
            ("Keyword arguments", f"<code>{js(doc.get('kwargs'))}</code>" if doc.get("kwargs") else "-"),
            ("Attempts", h(doc["attempts"])), ("Enqueued (UTC)", h(iso(doc.get("enqueued_at")))),
            ("Started (UTC)", h(iso(doc.get("started_at")))), ("Ended (UTC)", h(iso(doc.get("ended_at")))),
            ("Waited", h(dur(doc.get("waited")))), ("Ran", h(dur(doc.get("ran")))),
            ("Worker", h(doc.get("worker") or "-")),
            ("Checkpoint", f"<code>{js(doc['checkpoint'])}</code>" if doc.get("checkpoint") is not None else "-")]
    if st == "done":
        rows.append(("Result", f"<code>{js(doc.get('result'))}</code>"))
    if doc.get("warning"):
        rows.append(("Warning", h(doc["warning"])))
    body = table(("Field", "Value"), rows)
    if st in ("queued", "scheduled"):
        body += button(ctx, f"/jobs/{quote(doc['id'])}/cancel", "Cancel", {}, danger=True,
                       confirm="Cancel this job? It will not run.")
    err = doc.get("error")
    if err:
        body += (f"<h2>Error</h2><p><b>{h(err.get('type'))}</b>: {h(err.get('message'))} "
                 f"(cause: {h(err.get('cause'))})</p><pre>{h(err.get('traceback') or '')}</pre>")
        body += button(ctx, "/failed/retry", "Retry", {"id": doc["id"], "back": f"/jobs/{quote(doc['id'])}"})
        body += button(ctx, "/failed/delete", "Delete", {"id": doc["id"], "back": "/failed"}, danger=True,
                       confirm="Delete this failed job?")
    history = (doc.get("history") or []) + [e for e in doc.get("errors") or [] if e not in (doc.get("history") or [])]
    if history:
        body += "<h2>Attempts</h2><ol>" + "".join(f"<li><code>{js(e)}</code></li>" for e in history) + "</ol>"
    return f"Job {job_id}", body, {"status": st}


def failed(ctx: Ctx, doc: dict, name: str, etype: str):
    def select(field, options, current):
        opts = ['<option value="">any</option>'] + [
            f'<option value="{h(o)}"{" selected" if o == current else ""}>{h(o or "(none)")} ({c})</option>'
            for o, c in sorted(options.items())]
        return f'<label>{field} <select name="{field}">{"".join(opts)}</select></label>'
    filters = (f'<form class="filters" method="get" action="{h(ctx.root)}/failed">{select("name", doc["names"], name)}'
               f'{select("type", doc["types"], etype)}<button type="submit">Filter</button></form>')
    rows = []
    for rec in doc["jobs"]:
        rid = rec.get("id")
        box = "" if ctx.read_only else f'<input type="checkbox" name="id" value="{h(rid)}" form="bulk">'
        rows.append((box, job_link(ctx, rid if isinstance(rid, str) else None, rid), h(rec.get("name")),
                     h(rec.get("queue")), f"<b>{h(rec.get('type'))}</b>: {h(str(rec.get('message') or '')[:200])}",
                     h(rec.get("attempts")), h(iso(rec.get("failed_at")))))
    back = "/failed?" + urlencode({"name": name, "type": etype})
    actions = ""
    if not ctx.read_only and rows:
        actions = (f'<form id="bulk" method="post" action="{h(ctx.root)}/failed/retry" class="inline">'
                   f'<input type="hidden" name="csrf" value="{CSRF_SLOT}"><input type="hidden" name="back" '
                   f'value="{h(back)}"><button type="submit">Retry selected</button>'
                   f'<button type="submit" formaction="{h(ctx.root)}/failed/delete" class="danger" '
                   f'data-confirm="Delete the selected failed jobs?">Delete selected'
                   f"</button></form> "
                   f'<a href="{h(ctx.root)}/failed/confirm?{h(urlencode({"action": "retry", "name": name, "type": etype}))}">'
                   f'Retry all {doc["matched"]} matching…</a> · '
                   f'<a href="{h(ctx.root)}/failed/confirm?{h(urlencode({"action": "delete", "name": name, "type": etype}))}">'
                   f'Delete all {doc["matched"]} matching…</a>')
    sel = "" if ctx.read_only else '<input type="checkbox" data-select-all aria-label="select all">'
    body = (filters + f'<p>{doc["matched"]} of <span data-live="failed">{doc["count"]}</span> failed jobs match.</p>'
            + skipped(doc) + actions + pager(ctx, "/failed", doc, {"name": name, "type": etype})
            + (table((sel, "Id", "Name", "Queue", "Error", "Attempts", "Failed (UTC)"), rows, num=(5,))
               if rows else p("No failed jobs match.")))
    return "Failed jobs", body, {"failed": doc["count"]}


def confirm(ctx: Ctx, action: str, name: str, etype: str, n: int):
    what = f"{'Retry' if action == 'retry' else 'Delete'} all {n} failed job(s)"
    where = f" named {name!r}" if name else ""
    where += f" with error type {etype!r}" if etype else ""
    form = button(ctx, f"/failed/{action}", f"Yes: {what.lower()}",
                  {"all": "1", "confirm": "yes", "name": name, "type": etype, "back": "/failed"},
                  danger=action == "delete")
    back = f'<a href="{h(ctx.root)}/failed">Cancel</a>'
    return "Confirm", p(f"{what}{where}?") + (form or p("This dashboard is read-only.")) + " " + back, {}


def scheduled(ctx: Ctx, doc: dict):
    rows = []
    for j in doc["jobs"]:
        back = f"/scheduled?page={doc['page']}"
        acts = button(ctx, "/scheduled/run", "Run now", {"payload": j["raw_payload"], "back": back}) + " " + \
            button(ctx, "/scheduled/delete", "Delete", {"payload": j["raw_payload"], "back": back}, danger=True,
                   confirm="Delete this scheduled job?")
        rows.append((job_link(ctx, j["id"]), h(j["name"] or ("(not a job)" if j["junk"] else "-")),
                     h(j["queue"]), f"<code>{js(j['args'])}</code>", "retry" if j["retry"] else "scheduled",
                     h(iso(j["due"])), h(dur(j["due_in"]) if j["due_in"] >= 0 else "due"), acts))
    body = (f'<p><span data-live="scheduled">{doc["count"]}</span> jobs wait for their time (retries with backoff, '
            f"enqueue_in/enqueue_at).</p>" + skipped(doc) + pager(ctx, "/scheduled", doc)
            + (table(("Id", "Name", "Queue", "Arguments", "Kind", "Due (UTC)", "In", ""), rows) if rows
               else p("Nothing scheduled.")))
    return "Scheduled and retries", body, {"scheduled": doc["count"]}


def periodic(ctx: Ctx, doc: dict):
    paused = set(doc["paused"])
    rows = [(h(s["name"]), h(s["spec"]), h(s["queue"]), h(iso(s["last"])), h(iso(s["next"])),
             h(f"{iso(s['skipped'])} ({s['skip_reason']})" if s.get("skipped") else "-"),
             "paused" if s["queue"] in paused or "*" in paused else "") for s in doc["schedules"]]
    body = table(("Schedule", "When", "Queue", "Last tick (UTC)", "Next tick (UTC)", "Last skipped", ""), rows) \
        if rows else p("No periodic jobs (workers write them here when they run schedules).")
    return "Periodic jobs", body, {}


def metrics(doc: dict) -> str:
    """Prometheus text format (0.0.4). Queue names are label values, escaped as the format requires."""
    def label(v):
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    out = ["# HELP worker_queue_depth Jobs waiting in the queue.", "# TYPE worker_queue_depth gauge"]
    out += [f'worker_queue_depth{{queue="{label(q["name"])}"}} {q["depth"] or 0}' for q in doc["queues"]]
    out += ["# HELP worker_queue_latency_seconds Age of the oldest waiting job.",
            "# TYPE worker_queue_latency_seconds gauge"]
    out += [f'worker_queue_latency_seconds{{queue="{label(q["name"])}"}} {q["latency"] or 0}' for q in doc["queues"]]
    out += ["# HELP worker_queue_paused 1 when the queue is paused.", "# TYPE worker_queue_paused gauge"]
    out += [f'worker_queue_paused{{queue="{label(q["name"])}"}} {int(q["paused"])}' for q in doc["queues"]]
    alive = [w for w in doc["workers"] if w["state"] != "dead"]
    out += ["# HELP worker_workers Live worker processes.", "# TYPE worker_workers gauge", f"worker_workers {len(alive)}",
            "# HELP worker_slots Job slots of live workers.", "# TYPE worker_slots gauge",
            f"worker_slots {sum(w['concurrency'] for w in alive)}",
            "# HELP worker_busy_slots Slots running a job.", "# TYPE worker_busy_slots gauge",
            f"worker_busy_slots {sum(len(w['slots']) for w in alive)}",
            "# HELP worker_failed_jobs Jobs in the failed registry.", "# TYPE worker_failed_jobs gauge",
            f"worker_failed_jobs {doc['failed']}",
            "# HELP worker_scheduled_jobs Jobs waiting for their time.", "# TYPE worker_scheduled_jobs gauge",
            f"worker_scheduled_jobs {doc['scheduled']}",
            "# HELP worker_jobs_processed_total Jobs done.", "# TYPE worker_jobs_processed_total counter",
            f"worker_jobs_processed_total {doc['totals']['processed']}",
            "# HELP worker_jobs_failed_total Jobs recorded as failed.", "# TYPE worker_jobs_failed_total counter",
            f"worker_jobs_failed_total {doc['totals']['failed']}"]
    return "\n".join(out) + "\n"
