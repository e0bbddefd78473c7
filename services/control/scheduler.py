"""The run queue: FIFO, one run at a time per cluster, driven by polling the PS's control port.

Each poll (every `poll_interval_s`, or at once after `wake()`):
  1. ask the PS for its status; keep it as the cluster snapshot (GET /v1/cluster, /readyz); a PS that has
     been unreachable for `lost_after_s` fails the active run, and if it comes back resuming that run, the
     run is cancelled there (the store's word stands);
  2. for each starting/running run in the store: copy the PS's new per-step records and events into the
     store, update its progress, follow its state at the PS (a run the PS does not know is resubmitted
     while `starting`, failed once `running`), forward a pending cancel;
  3. when no run is active and the PS is idle, claim the oldest queued run and submit it.
A control service restarted mid-run re-attaches to the run the PS kept going, in step 2.

With a launcher that supervises the PS process (`atomo up`), each poll first takes the launcher's news: a PS
that exited gives the active run a `ps_exited` event quoting the end of the PS's log (and fails it, with
that as its error, when the launcher gave up on the run after a crash loop); a restarted PS gives a
`ps_restarted` event. Under plain `atomo serve` there is no launcher and only the PS's control port counts.

With a worker scaler (`atomo serve --launcher kubernetes`, services/control/kubernetes.py), a claimed run is
submitted to the PS only once its `workers` have registered there: the scaler scales the worker
StatefulSet(s) to the run's `workers` when the run is claimed, each poll counts the live workers in the
PS's status once that scale succeeded, and a run still short `worker_wait_s` after it was claimed fails
with the scaler's account of the pods that are not ready (or, should that account take longer than
`EXPLAIN_WAIT_S`, without it: a run whose wait timed out always fails, and the queue moves on). Once no run
is active and none is queued for `release_after_s`, the workers are scaled back to the idle count (idle
GPUs go back to the cluster). The wait is all or nothing: a run whose wait failed (timed out, or its scale
refused) has its workers scaled back to the idle count at once, so the GPUs of a partly scheduled group are
not held while it is short; the next run asks for its own. Every scaler error fails the run it concerns
with its message, or (release, pod listing) is logged and retried; none stops the loop.

The scaler's calls never run on the poll's thread: scaling and releasing run in order on one thread of
their own, explaining a timed-out wait on a second, the pod listing on a third, and each poll collects what
they finished. A slow or
unreachable Kubernetes API holds those threads only (each request has a deadline), never the cancels, the
PS's metrics and the PS's status that /readyz reports.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common.ps_client import PSClient, PSError, PSUnavailable
from services.control.store import FINAL, Store

if TYPE_CHECKING:
    from services.control.kubernetes import KubernetesLauncher
    from services.control.launchers import Launcher

log = logging.getLogger("atomo.control")

PODS_REFRESH_S = 5.0  # GET /v1/cluster shows the worker pods as listed at most this long ago
RELEASE_RETRY_S = 30.0  # a failed scale-down is tried again after this long
EXPLAIN_WAIT_S = 60.0  # a run whose wait timed out fails without the pods' account if it takes longer

_FINAL_REASONS = {
    "succeeded": "the PS finished every step",
    "failed": "the PS reported a failure",
    "cancelled": "the PS stopped the run",
}


class _Lane:
    """Runs the calls given to `submit` one at a time, in that order, on a daemon thread of its own."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def close(self) -> None:
        """The thread ends after the call it is running, if any (it is not waited for)."""
        self._calls.put(None)

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # handed to whoever collects the result
                future.set_exception(exc)


@dataclass
class _WorkerWait:
    """A claimed run's wait for its workers: its scale request, then the PS's count, then (timed out) the
    scaler's account of the pods."""

    wanted: int
    deadline: float
    scaled: Future
    scale_seen: bool = False
    ready: bool = False
    explained: Future | None = None
    timed_out_at: float = 0.0
    live: int = 0


class Scheduler:
    def __init__(
        self,
        store: Store,
        ps: PSClient,
        run_duration=None,
        poll_interval_s: float = 0.5,
        lost_after_s: float = 120.0,
        launcher: Launcher | None = None,
        scaler: KubernetesLauncher | None = None,
        worker_wait_s: float = 600.0,
        release_after_s: float = 60.0,
    ):
        self.store = store
        self.ps = ps
        self.launcher = launcher
        self.scaler = scaler
        self.worker_wait_s = worker_wait_s
        self.release_after_s = release_after_s
        self.pods: list[dict] = []  # the worker pods as the scaler last listed them
        self.pods_error: str | None = None
        self._pods_at = -PODS_REFRESH_S
        self._listing: Future | None = None  # the pod listing under way
        self._waits: dict[str, _WorkerWait] = {}  # run id -> its wait for workers
        self._idle_since: float | None = None
        self._released = False  # the workers are at the idle count (unknown at start: released once idle)
        self._releasing: tuple[Future, int] | None = None  # the scale-down under way, and _scales when asked
        self._scales = 0  # scale requests so far: a scale-down asked before the latest one does not count
        lanes = ("atomo-k8s-scale", "atomo-k8s-explain", "atomo-k8s-pods") if scaler is not None else ()
        self._lanes = [_Lane(name) for name in lanes]
        self._scaler_lane, self._explain_lane, self._listing_lane = self._lanes or (None, None, None)
        self.run_duration = run_duration  # prometheus Histogram of finished runs' wall time, or None
        self.poll_interval_s = poll_interval_s
        self.lost_after_s = lost_after_s
        self.cluster: dict | None = None  # the PS's latest status reply
        self.last_contact: float | None = None
        self._unreachable_since: float | None = None
        self._attached: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="atomo-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for lane in self._lanes:
            lane.close()
        self.store.close()

    def wake(self) -> None:
        self._wake.set()

    def ps_down(self) -> str | None:
        """Why the PS is not serving, when its launcher knows its process exited; None otherwise."""
        process = self.launcher.ps_process() if self.launcher is not None else None
        if process is None or process["state"] != "down":
            return None
        return f"the PS process exited with status {process['exit_status']}; restarting it"

    def ps_reachable(self) -> bool:
        """The PS answered a recent poll (and its launcher, if any, does not know it to be down)."""
        if self.ps_down() is not None:
            return False
        horizon = max(2.0, 4 * self.poll_interval_s) + self.ps.timeout_ms / 1000
        return self.last_contact is not None and time.time() - self.last_contact < horizon

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except (PSUnavailable, PSError) as exc:  # a PS that went away mid-poll: the next poll sees it
                log.warning("scheduler poll cut short: %s", exc)
            except Exception:  # the loop must outlive any one bad poll; the cause is logged
                log.exception("scheduler poll failed")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
        self.store.close()

    # One poll -----------------------------------------------------------------------------------------

    def poll_once(self) -> None:
        self._take_launcher_news()
        try:
            status = self.ps.status()
        except (PSUnavailable, PSError) as exc:
            self._ps_lost(str(exc))
            return
        self._take_launcher_news()  # the PS may have died and been restarted while the status call waited
        self.cluster, self.last_contact, self._unreachable_since = status, time.time(), None
        live = status.get("run") or None
        known = dict(status.get("runs") or {})
        if live:
            known[live["run_id"]] = live["state"]
        busy = bool(live) and live["state"] not in FINAL
        for run in self.store.active_runs():
            self._follow(run, live if live and live["run_id"] == run["id"] else None, known.get(run["id"]), busy)
        if busy:
            self._stop_if_ended_here(live["run_id"])
        if not busy and not self.store.active_runs():
            self._submit_next()
        if self.scaler is not None:
            self._release_when_idle(busy)
            self._refresh_pods()

    def _stop_if_ended_here(self, run_id: str) -> None:
        """A run the store already ended (e.g. failed while the PS was unreachable) but that a restarted PS
        resumed: the store's word stands, so the PS is told to cancel it."""
        run = self.store.get_run(run_id)
        if run is not None and run["state"] in FINAL:
            log.warning("the PS resumed run %s, which is %s here: cancelling it at the PS", run_id, run["state"])
            self.ps.cancel(run_id)

    def _take_launcher_news(self) -> None:
        if self.launcher is not None:
            for event in self.launcher.drain_events():
                self._on_launcher_event(event)

    def _on_launcher_event(self, event: dict) -> None:
        """The PS process exited or was restarted: an event on each active run; a run the launcher gave up
        on (a crash loop) fails here with the end of the PS's log as its error."""
        if event["type"] == "ps_exited":
            self.last_contact = None  # not ready from now on, not only once the next status times out
        for run in self.store.active_runs():
            self.store.add_event(run["id"], event["type"], {k: v for k, v in event.items() if k != "type"})
            if event["type"] == "ps_exited" and event.get("run_failed") and event.get("run_id") == run["id"]:
                tail = event["log_tail"]
                reason = f"the PS died {event['deaths']} times during this run; the end of its log:\n{tail}"
                self._finish(run, "failed", reason, error=reason)

    def _ps_lost(self, why: str) -> None:
        now = time.time()
        self._unreachable_since = self._unreachable_since or now
        if now - self._unreachable_since < self.lost_after_s:
            return
        for run in self.store.active_runs():
            reason = f"the PS has been unreachable for {now - self._unreachable_since:.0f} s ({why})"
            self._finish(run, "failed", reason, error=reason)

    def _follow(self, run: dict, live: dict | None, ps_state: str | None, busy: bool) -> None:
        run_id = run["id"]
        if ps_state is None:
            if run["state"] == "starting" and run["cancel_requested"]:
                self._finish(run, "cancelled", "cancelled before the PS started it")
            elif run["state"] == "starting" and not busy:
                self._submit(run)
            elif run["state"] == "running":
                reason = "the PS does not know this run (it restarted without its state)"
                self._finish(run, "failed", reason, error=reason)
            return
        if run_id not in self._attached:
            self._attached.add(run_id)
            if run["state"] == "running":
                self.store.add_event(run_id, "attached", {"reason": "the control service (re)started; the PS kept it"})
        records = self.ps.metrics(run_id, self.store.last_step(run_id))
        if records:
            self.store.add_metrics(run_id, records)
        self.store.add_ps_events(run_id, self.ps.events(run_id, run["ps_event_seq"]))
        self.store.set_progress(run_id, live if live is not None else self.store.progress_from_metrics(run_id))
        if ps_state == "running":
            self.store.transition(run_id, "running", "the PS started training", from_states=("starting",))
        elif ps_state in FINAL:
            error = (live or {}).get("error")
            reason = "cancelled on request" if ps_state == "cancelled" and run["cancel_requested"] else None
            reason = reason or (f"the PS reported: {error}" if error else _FINAL_REASONS[ps_state])
            self._finish(run, ps_state, reason, error=error)
            return
        if run["cancel_requested"]:
            self.ps.cancel(run_id)

    def _submit_next(self) -> None:
        run = self.store.next_queued()
        if run is not None and self.store.transition(
            run["id"], "starting", "submitted to the PS", from_states=("queued",)
        ):
            self._submit(run)

    def _submit(self, run: dict) -> None:
        if self.scaler is not None and not self._workers_ready(run):
            return
        try:
            self.ps.submit(run["id"], run["spec"])
        except PSUnavailable:
            return  # the next poll sees whether the PS got it, and resubmits if not
        except PSError as exc:
            self._finish(run, "failed", f"the PS rejected the run: {exc}", error=str(exc))

    # Worker scaling (Kubernetes) ----------------------------------------------------------------------

    def _workers_ready(self, run: dict) -> bool:
        """True once `run`'s workers are live at the PS, after its scale request (sent when the run is first
        seen here) succeeded. A scaling error, or a wait past `worker_wait_s`, fails the run with the reason;
        nothing here waits for the Kubernetes API (see the module's doc)."""
        run_id, now = run["id"], time.monotonic()
        wait = self._waits.get(run_id)
        if wait is None:
            wanted = int(run["spec"]["workers"])
            scaled = self._scaler_lane.submit(self.scaler.scale_for_run, wanted)
            wait = self._waits[run_id] = _WorkerWait(wanted, now + self.worker_wait_s, scaled)
            self._released, self._scales = False, self._scales + 1
        if wait.ready:
            return True
        if not wait.scale_seen and wait.scaled.done():
            if wait.scaled.exception() is not None:
                error = _error_text(wait.scaled.exception())
                self._finish(run, "failed", f"the workers could not be scaled: {error}", error=error)
                self._release_now()  # a group of several StatefulSets may have been scaled in part
                return False
            wait.scale_seen = True
            plan = wait.scaled.result()
            self.store.add_event(run_id, "workers_requested", {"workers": wait.wanted, "statefulsets": plan})
        if wait.explained is None:
            wait.live = sum(w.get("state") != "lost" for w in (self.cluster or {}).get("workers") or [])
            if wait.scale_seen and wait.live >= wait.wanted:
                wait.ready = True
                return True
            if now > wait.deadline:
                wait.explained, wait.timed_out_at = self._explain_lane.submit(self.scaler.explain, wait.wanted), now
        if wait.explained is not None and (wait.explained.done() or now - wait.timed_out_at > EXPLAIN_WAIT_S):
            if not wait.explained.done():
                why = f"the Kubernetes API did not say why within {EXPLAIN_WAIT_S:.0f} s"
            elif wait.explained.exception() is not None:
                why = _error_text(wait.explained.exception())
            else:
                why = wait.explained.result()
            if not wait.scale_seen:
                why = f"the scale request has not been answered; {why}"
            reason = f"{wait.live} of {wait.wanted} workers registered with the PS within {self.worker_wait_s:.0f} s; "
            self._finish(run, "failed", reason + why, error=reason + why)
            self._release_now()
        return False

    def _release_now(self) -> None:
        """All or nothing: scale the workers of a run whose wait failed back to the idle count now (queued on
        the scaler's lane, so a later run's scale comes after it), not `release_after_s` later."""
        if self._releasing is None:
            self._releasing = (self._scaler_lane.submit(self.scaler.release), self._scales)

    def _release_when_idle(self, busy: bool) -> None:
        """Scale the workers to the idle count once nothing has been active or queued for `release_after_s`."""
        now = time.monotonic()
        if self._releasing is not None and self._releasing[0].done():
            (released, scales), self._releasing = self._releasing, None
            if released.exception() is not None:
                error = _error_text(released.exception())
                log.warning("could not scale the idle workers down (retrying in %.0f s): %s", RELEASE_RETRY_S, error)
                self._idle_since = now - self.release_after_s + RELEASE_RETRY_S
            elif scales == self._scales:  # no run asked for workers since
                self._released = True
                log.info("queue empty: workers scaled to %s", released.result())
        if busy or self.store.active_runs() or self.store.next_queued() is not None:
            self._idle_since = None
            return
        self._idle_since = self._idle_since if self._idle_since is not None else now
        if self._released or self._releasing is not None or now - self._idle_since < self.release_after_s:
            return
        self._releasing = (self._scaler_lane.submit(self.scaler.release), self._scales)

    def _refresh_pods(self) -> None:
        if self._listing is not None:
            if not self._listing.done():
                return
            if self._listing.exception() is not None:
                self.pods_error = _error_text(self._listing.exception())
            else:
                self.pods, self.pods_error = self._listing.result(), None
            self._listing = None
        now = time.monotonic()
        if now - self._pods_at >= PODS_REFRESH_S:
            self._pods_at = now
            self._listing = self._listing_lane.submit(self.scaler.pods)

    def _finish(self, run: dict, state: str, reason: str, error: str | None = None) -> None:
        self._waits.pop(run["id"], None)
        if self.store.transition(run["id"], state, reason, error=error) and self.run_duration is not None:
            finished = self.store.get_run(run["id"])
            if finished["started_at"] is not None:
                self.run_duration.observe(finished["finished_at"] - finished["started_at"])


def _error_text(exc: BaseException) -> str:
    """A scaler's error as the run's error: a LaunchError's message as is, anything else with its type."""
    from services.control.kubernetes import LaunchError

    return str(exc) if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
