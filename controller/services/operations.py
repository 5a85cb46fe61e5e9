"""The persistent operation runner: each operation kind has a handler, and every running operation has
one guarded task.

How an operation survives trouble:
- Its row is written in the same transaction as whatever it claims, before any command leaves.
- Commands carry the operation id and the operation's deadline. The agent applies an id once and
  ignores commands past their deadline, so the controller may re-send freely.
- After a controller restart every ``running`` operation is resumed (:meth:`Operations.resume`): its
  handler runs again, and a reply that arrived while the controller was away is delivered by the
  broker (persistent session).

Services register the kinds they own (``vms``: create, start, stop...; ``migration``: migrate,
evacuate). A handler that crashes gets its kind's ``on_crash``, which fails the operation or leaves it
running for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controller.common.errors import Conflict, NotFound
from controller.common.tasks import TaskSet
from controller.state.events import EventHub
from controller.state.store import OperationRecord, OpKind, Store

log = logging.getLogger(__name__)

Handler = Callable[[OperationRecord], Awaitable[None]]
CrashHandler = Callable[[OperationRecord, Exception], None]


@dataclass(frozen=True, slots=True)
class _Kind:
    run: Handler
    on_crash: CrashHandler


class Operations:
    """Runs operations through their kind's handler; :meth:`wait` waits for one to end."""

    def __init__(self, store: Store, events: EventHub) -> None:
        self.store = store
        self.events = events
        self._kinds: dict[str, _Kind] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._tasks = TaskSet("operations")
        self._closing = False

    def register(self, kinds: tuple[OpKind, ...], run: Handler, on_crash: CrashHandler) -> None:
        """Make ``run`` the handler of each of ``kinds``."""
        for kind in kinds:
            self._kinds[kind] = _Kind(run, on_crash)

    def require(self, op_id: str) -> OperationRecord:
        """The operation ``op_id``.

        Raises:
            NotFound: no such operation.
        """
        record = self.store.operation(op_id)
        if record is None:
            raise NotFound("unknown_operation", f"operation {op_id!r} does not exist")
        return record

    def flag_cancelled(self, op_id: str, kind: OpKind, what: str) -> tuple[OperationRecord, bool]:
        """Mark the running ``kind`` operation ``op_id`` cancelled, in its params, so that its runner
        (and the runner resumed after a restart) stops at its next step. Returns the operation, and
        whether this call set the flag (False: it was cancelled already).

        Raises:
            NotFound: no such operation. Conflict: not a running ``kind`` (``what`` names it).
        """
        op = self.require(op_id)
        if op.kind != kind or op.state != "running":
            raise Conflict("invalid_state", f"operation {op_id} is not a running {what}")
        if op.params.get("cancelled"):
            return op, False
        return self.store.update_operation(op_id, {**op.params, "cancelled": True}), True

    def cancelled(self, op_id: str) -> bool:
        """Whether operation ``op_id`` was flagged cancelled (:meth:`flag_cancelled`)."""
        op = self.store.operation(op_id)
        return op is not None and bool(op.params.get("cancelled"))

    def start(self, op: OperationRecord) -> None:
        """Run ``op`` in the background; :meth:`wait` waits for it."""
        self._done[op.op_id] = asyncio.Event()
        self._tasks.spawn(self._run(op), name=f"op:{op.kind}:{op.vm or op.host_id}")

    def resume(self) -> int:
        """Resume every operation a previous controller left running. Returns how many."""
        ops = self.store.running_operations()
        for op in ops:
            log.info("resuming operation %s (%s %s)", op.op_id, op.kind, op.vm)
            self.start(op)
        if ops:
            self.events.emit("controller.resumed", f"resumed {len(ops)} unfinished operation(s)")
        return len(ops)

    async def wait(self, op_id: str, timeout: float) -> OperationRecord:
        """The operation after it ends, or as it stands after ``timeout`` seconds.

        Raises:
            NotFound: no such operation.
        """
        done = self._done.get(op_id)
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout)
        return self.require(op_id)

    async def _run(self, op: OperationRecord) -> None:
        kind = self._kinds[op.kind]
        try:
            await kind.run(op)
        except asyncio.CancelledError:
            raise  # controller shutting down: the operation stays running and resumes next start
        except Exception as exc:
            log.exception("operation %s crashed", op.op_id)
            kind.on_crash(op, exc)
        finally:
            done = self._done.get(op.op_id)
            if done is not None and not self._closing:
                done.set()

    def finish(self, op: OperationRecord, ok: bool, error: str = "") -> None:
        """End a VM operation in the store and say so in the events."""
        self.store.finish_operation(op.op_id, "succeeded" if ok else "failed", error)
        if ok:
            self.events.emit(
                "operation.succeeded",
                f"{op.kind} vm {op.vm}: done",
                host_id=op.host_id or "",
                vm=op.vm,
                op_id=op.op_id,
            )
        else:
            self.events.emit(
                "operation.failed",
                f"{op.kind} vm {op.vm} failed: {error}",
                host_id=op.host_id or "",
                vm=op.vm,
                op_id=op.op_id,
            )

    async def close(self) -> None:
        """Stop every runner; their operations stay ``running`` and resume at the next start."""
        self._closing = True
        await self._tasks.close()
