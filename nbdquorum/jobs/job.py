"""Cancellable background jobs in QEMU's job vocabulary.

Theory of operation: a Job is an asyncio task with QEMU's status machine
(qapi/job.json JobStatus): created -> running <-> paused -> waiting ->
pending -> concluded -> null (dismissed).  Every transition emits
JOB_STATUS_CHANGE {id, status}; the end emits BLOCK_JOB_COMPLETED (with
``error`` on failure) or BLOCK_JOB_CANCELLED, with QEMU's fields (type,
device, len, offset, speed).  Jobs auto-dismiss like QEMU's default.  A job's
work is a loop of steps; between steps it honours pause, cancel and the rate
limit (bytes/second, 0 = unlimited), which can change while it runs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import Any

from nbdquorum.eventbus import EventBus

log = logging.getLogger(__name__)


class JobStatus(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobError(Exception):
    """Refused job operation; ``desc`` is client-facing (QEMU's wording)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class Job:
    job_type = "job"

    def __init__(self, job_id: str, device: str, bus: EventBus, *, speed: int = 0) -> None:
        self.id = job_id  # job-id, unique among live jobs
        self.device = device  # the node the job works on (QEMU's "device")
        self.bus = bus
        self.speed = speed  # bytes/second, 0 = unlimited
        self.status = JobStatus.CREATED
        self.current = 0  # current-progress (bytes done)
        self.total = 0  # total-progress (bytes to do)
        self.error: str | None = None
        self.cancelled = False
        self.started = time.monotonic()
        self.finished: float | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._rate_t0 = time.monotonic()
        self._rate_bytes = 0
        self.manager: JobManager | None = None

    # -- status machine -----------------------------------------------------------
    def _set(self, status: JobStatus) -> None:
        if status is self.status:
            return
        log.info("job %s: %s -> %s", self.id, self.status, status)
        self.status = status
        self.bus.emit("JOB_STATUS_CHANGE", {"status": str(status), "id": self.id})

    def start(self) -> None:
        self.bus.emit("JOB_STATUS_CHANGE", {"status": str(JobStatus.CREATED), "id": self.id})
        self._task = asyncio.get_running_loop().create_task(self._main(), name=f"job-{self.id}")

    async def _main(self) -> None:
        if not self.cancelled:  # a job cancelled before it ran goes straight to aborting
            self._set(JobStatus.RUNNING)
            try:
                await self.run()
            except asyncio.CancelledError:
                self.cancelled = True
            except Exception as err:  # a job failure is reported, never raised into the loop
                self.error = str(err) or type(err).__name__
                log.error("job %s failed: %s", self.id, self.error)
        self.finished = time.monotonic()
        if self.cancelled:
            self._set(JobStatus.ABORTING)
        else:
            self._set(JobStatus.WAITING)
            self._set(JobStatus.PENDING)
        try:
            self.finalize()
        except Exception:
            log.exception("job %s finalize", self.id)
        info = {
            "type": self.job_type,
            "speed": self.speed,
            "len": self.total,
            "offset": self.current,
            "device": self.id,
        }
        if self.cancelled:
            self.bus.emit("BLOCK_JOB_CANCELLED", info)
        else:
            if self.error is not None:
                info["error"] = self.error
            self.bus.emit("BLOCK_JOB_COMPLETED", info)
        self._set(JobStatus.CONCLUDED)
        self._done.set()
        self._set(JobStatus.NULL)
        if self.manager is not None:
            self.manager.forget(self)

    async def run(self) -> None:
        raise NotImplementedError

    def finalize(self) -> None:
        """Runs once after run() ends (success, error or cancel)."""

    # -- control -------------------------------------------------------------------
    def pause(self) -> None:
        if self.status is not JobStatus.RUNNING:
            raise JobError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb 'pause'")
        self._resume.clear()
        self._set(JobStatus.PAUSED)

    def resume(self) -> None:
        if self.status is not JobStatus.PAUSED:
            raise JobError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb 'resume'")
        self._resume.set()
        self._rate_t0, self._rate_bytes = time.monotonic(), 0
        self._set(JobStatus.RUNNING)

    def cancel(self) -> None:
        if self.status not in (JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED):
            raise JobError(f"Job '{self.id}' in state '{self.status}' cannot accept command verb 'cancel'")
        self.cancelled = True
        self._resume.set()
        # a task cancelled before its first step would never run _main, so the job
        # would never conclude (and shutdown would wait on it forever): a job still
        # created is left to start, see it is cancelled, and wind down
        if self._task is not None and self.status is not JobStatus.CREATED:
            self._task.cancel()

    def set_speed(self, speed: int) -> None:
        if speed < 0:
            raise JobError("Parameter 'speed' expects a non negative value")
        self.speed = speed
        self._rate_t0, self._rate_bytes = time.monotonic(), 0

    async def wait(self) -> None:
        await self._done.wait()

    # -- helpers for run() --------------------------------------------------------------
    async def checkpoint(self, nbytes: int, *, cost: int | None = None) -> None:
        """Account progress, then honour pause and the rate limit.

        ``cost`` is what the step charges against the rate limit when it differs
        from its progress (a skipped all-zero range moved no data)."""
        self.current += nbytes
        self._rate_bytes += nbytes if cost is None else cost
        if self.speed > 0:
            due = self._rate_t0 + self._rate_bytes / self.speed
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if not self._resume.is_set():
            await self._resume.wait()

    def info(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "current-progress": self.current,
            "status": str(self.status),
            "total-progress": self.total,
            "type": self.job_type,
            "id": self.id,
        }
        if self.error is not None:
            d["error"] = self.error
        return d


class JobManager:
    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.jobs: dict[str, Job] = {}
        #: finished jobs' last info, newest last (for status displays)
        self.history: list[dict[str, Any]] = []

    def add(self, job: Job) -> Job:
        if job.id in self.jobs:
            raise JobError(f"Job ID '{job.id}' already in use")
        job.manager = self
        self.jobs[job.id] = job
        job.start()
        return job

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise JobError(f"Job ID '{job_id}' not found") from None

    def forget(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        info = job.info()
        info["status"] = "concluded"
        info["elapsed"] = round((job.finished or time.monotonic()) - job.started, 3)
        if job.cancelled:
            info["cancelled"] = True
        self.history = [*self.history[-19:], info]

    def query(self) -> list[dict[str, Any]]:
        return [j.info() for j in self.jobs.values()]

    async def shutdown(self) -> None:
        """Cancel running jobs (their progress is persisted by finalize)."""
        for job in list(self.jobs.values()):
            if job.status in (JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED):
                job.cancel()
        for job in list(self.jobs.values()):
            await job.wait()
