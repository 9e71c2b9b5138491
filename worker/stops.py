"""The stop timeline: what every running job gets after the worker's first TERM/INT. Described here, once.

Every step is derived from one moment, ``SignalState.stop_at`` (the first TERM/INT; repeats never move it), and
applies to every running slot at once, the same step at the same time (Sidekiq's ``manager.rb#stop``, with the
steps as data). :meth:`worker.slots.SlotTable.service` takes each step whose time has come, and
:meth:`~worker.slots.SlotTable.due` says when the next one comes, both from :data:`STEPS`::

    at                              step     what the slot's child gets
    stop_at                         TERMED   SIGTERM (so foreman's parent-only TERM equals Heroku's; the signal
                                             handler also forwards it at once, ``signals.SignalState._on_stop``)
    stop_at + TERM_GRACE            RAISED   the RAISE signal: TermException in the job (``child.py``)
    stop_at + GRACE + TERM_TIMEOUT  KILLED   SIGKILL to its process group (``Kill.DEADLINE``), unless the worker
                                             killed it already for another reason; the job is put back at the head
                                             of its queue (``policy.decide``: INTERRUPTED)
    stop_at + WINDOW - 0.5          -        (the watchdog, ``signals.py``, not a step) hard exit: the worker is gone
                                             whatever Redis is doing; a job not yet recorded stays in the processing
                                             list and is recovered by another worker, so nothing is lost

A child whose pid comes after the stop (it was being forked) gets every step already due at once; a job the fork
server has not started by the KILLED step (a stalled server) goes back unstarted then (``SlotTable._spawn_by``). The supervisor's
own side of a stop is ``Supervisor.quiet`` (claim nothing more), ``wait_for`` (this timeline) and ``bookkeeping``
(record, unregister, leave); ``config.py`` derives TERM_TIMEOUT from the window so that the KILLED step and the
bookkeeping fit before the hard exit.
"""
from __future__ import annotations

import signal
from enum import IntEnum
from typing import Callable, NamedTuple

from .signals import RAISE_SIGNAL


class Stage(IntEnum):
    """How far the stop timeline went for one slot's child: the slot's stop state, one value."""

    RUNNING = 0   # no stop yet (or no child yet)
    TERMED = 1
    RAISED = 2
    KILLED = 3    # the deadline step was taken (or found moot: the child was killed for another reason first)


class Step(NamedTuple):
    stage: Stage                    # the stage a slot is in once the step is taken
    offset: Callable                # cfg -> seconds after stop_at
    signum: int                     # the signal sent to the child (SIGKILL: to its process group, through Slot.kill)
    event: str                      # the log event that says so ('' = none)


STEPS = (
    Step(Stage.TERMED, lambda cfg: 0.0, signal.SIGTERM, ""),
    Step(Stage.RAISED, lambda cfg: cfg.term_grace, RAISE_SIGNAL, "shutdown.exception_delivered"),
    Step(Stage.KILLED, lambda cfg: cfg.term_grace + cfg.term_timeout, signal.SIGKILL, "shutdown.child_killed"),
)


def next_step(stage: Stage):
    """The step after ``stage``, or None when the timeline is over for that slot."""
    return STEPS[stage] if stage < len(STEPS) else None
