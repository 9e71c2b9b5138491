"""Queue groups (``QUEUE_GROUPS``, issue 26 point 2): the rule for queue names and the parsing of the grouping.

``QUEUE_GROUPS=fast=default,mail;slow=reports,exports`` splits the queues into groups, each its own key space
(``KEY_PREFIX:<group>``; ``{KEY_PREFIX:<group>}`` on a cluster: its own hash tag, so its own slot). A worker serves one
group (``QUEUES=@slow``, or queues of one group); producers route each enqueue to its queue's group; the read model
reads every group (``Config.spaces``). docs/cluster.md "Queue groups" describes it for users. ``config.py`` turns a
:class:`GroupsError` into its ``ConfigError`` (one line naming the variable, exit 2 before connecting).
"""
from __future__ import annotations

import re

_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
QUEUE_RULE = "1-100 letters, digits, _ . : -"


def valid_queue_name(name) -> bool:
    """The one rule for queue names, as ``QUEUES`` takes them (enqueue and pause/resume use it too): the names end
    up inside Redis keys and in comma-separated settings, so ``*``, ``,``, spaces and control characters are out."""
    return isinstance(name, str) and _QUEUE_RE.fullmatch(name) is not None


class GroupsError(ValueError):
    """QUEUE_GROUPS, or QUEUES against it, is not valid (``str(err)``: the one-line message)."""


_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
#: the second segment of the runtime's ungrouped keys (``P:<word>:...``, keys.py): a group of that name would share
#: key names with an ungrouped deployment of the same KEY_PREFIX (``worker:queue`` + ``:queue:x``...)
KEY_WORDS = {"queues", "queue", "wake", "processing", "workers", "recovered", "cancel", "suspects", "worker", "job",
             "done", "scheduled", "failed", "enq", "paused", "sched", "schedules", "epoch", "stat", "metrics",
             "running", "held", "rate", "unique", "group", "group_ids", "group_res"}  # (issue 25: limits, locks, groups)
GROUPS_SYNTAX = "group=queue,queue;group=queue,... (group: 1-32 letters, digits, _ -)"


def queue_groups(raw) -> tuple:
    """``QUEUE_GROUPS=fast=default,mail;slow=reports``: ``(("fast", ("default", "mail")), ("slow", ("reports",)))``.
    Every group names at least one queue; a queue is in one group only; group names are unique."""
    if raw is None or raw.strip() == "":
        return ()
    out, seen = [], {}
    for part in raw.strip().strip(";").split(";"):
        name, eq, rest = part.partition("=")
        name = name.strip()
        if not eq or not _GROUP_RE.match(name):
            raise GroupsError(f"QUEUE_GROUPS={raw!r} is not valid: {part.strip()!r} is not group=queue,...; "
                              f"expected {GROUPS_SYNTAX}")
        if name in KEY_WORDS:
            raise GroupsError(f"QUEUE_GROUPS={raw!r} is not valid: group {name!r} is a word of the key schema "
                              f"(keys.py); choose another name")
        if name in dict(out):
            raise GroupsError(f"QUEUE_GROUPS={raw!r} is not valid: group {name!r} is named twice")
        queues = tuple(q.strip() for q in rest.split(","))
        for q in queues:
            if not valid_queue_name(q):
                raise GroupsError(f"QUEUE_GROUPS={raw!r} is not valid: {q!r} in group {name!r} is not a queue name "
                                  f"({QUEUE_RULE})")
            if q in seen:
                raise GroupsError(f"QUEUE_GROUPS={raw!r} is not valid: queue {q!r} is in groups {seen[q]!r} and "
                                  f"{name!r}; a queue belongs to one group")
            seen[q] = name
        out.append((name, queues))
    return tuple(out)


def worker_group(env, groups: tuple, queues: tuple) -> tuple:
    """``(group, queues)`` a worker serves: ``QUEUES=@group`` (every queue of it, in its order), queues that all lie
    in one group, or, QUEUES unset, the first group. Ungrouped: ``("", queues)``; ``@group`` is then refused."""
    raw = (env.get("QUEUES") or "").strip()
    if not groups:
        if raw.startswith("@"):
            raise GroupsError(f"QUEUES={raw!r} is not valid: @group needs QUEUE_GROUPS (no groups are set)")
        return "", queues
    byname = dict(groups)
    if raw.startswith("@"):
        if raw[1:] not in byname:
            raise GroupsError(f"QUEUES={raw!r} is not valid: no group {raw[1:]!r} in QUEUE_GROUPS "
                              f"(groups: {', '.join(byname)})")
        return raw[1:], byname[raw[1:]]
    if not raw:
        return groups[0][0], groups[0][1]
    if queues == ("*",):
        raise GroupsError(f"QUEUES='*' is not valid with QUEUE_GROUPS: a worker serves one group; name it "
                          f"(QUEUES=@{groups[0][0]}) or list queues of one group")
    owner = {q: g for g, qs in groups for q in qs}
    lone = [q for q in queues if q not in owner]
    if lone:
        raise GroupsError(f"QUEUES={raw!r} is not valid: queue {lone[0]!r} is in no group of QUEUE_GROUPS")
    found = sorted({owner[q] for q in queues})
    if len(found) > 1:
        raise GroupsError(f"QUEUES={raw!r} is not valid: its queues lie in groups {', '.join(found)}; a worker "
                          f"serves one group (QUEUES=@group, or queues of one group)")
    return found[0], queues
