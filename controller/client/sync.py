"""``Client``: the same client for code that does not run an event loop (scripts, the CLI).

    with Client.from_env() as fv:
        op = fv.hosts.evacuate("h3")
        fv.operations.wait(op.op_id, check=True)

Each resource method of :class:`~controller.client.aio.AsyncClient` is offered here under the same
name, with the same arguments and answers, and runs on an event loop the ``Client`` owns
(``asyncio.Runner``); iterators (``events.follow``, ``operations.iterate``...) become plain ones.
Nothing is written twice: every method here is the async one, run to its end. Ctrl-C during a
call raises ``KeyboardInterrupt`` as usual, and the call is cancelled (what the controller started
goes on). A ``Client`` is for one thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from controller.client.actions import Actions, Rolling
from controller.client.admin import Audit, Power, Tokens
from controller.client.aio import AsyncClient, _env
from controller.client.events import Events
from controller.client.hosts import Hosts
from controller.client.operations import Operations
from controller.client.transport import DEFAULT_URL
from controller.client.vms import Vms

P = ParamSpec("P")
T = TypeVar("T")


class _Resource:
    """One resource of the async client, run on the ``Client``'s loop."""

    def __init__(self, runner: asyncio.Runner, target: Any) -> None:
        self._runner = runner
        self._target = target


class _Blocking(Generic[P, T]):
    """An ``async def`` method of a resource, offered as a plain one."""

    def __init__(self, method: Callable[Concatenate[Any, P], Coroutine[Any, Any, T]]) -> None:
        self.__doc__ = method.__doc__
        self._name = method.__name__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _Blocking[P, T]: ...
    @overload
    def __get__(self, obj: _Resource, owner: type[Any]) -> Callable[P, T]: ...
    def __get__(self, obj: _Resource | None, owner: type[Any]) -> _Blocking[P, T] | Callable[P, T]:
        if obj is None:
            return self
        method = getattr(obj._target, self._name)
        runner = obj._runner

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            result: T = runner.run(method(*args, **kwargs))
            return result

        return call


class _BlockingIter(Generic[P, T]):
    """An async generator method of a resource, offered as a plain iterator."""

    def __init__(self, method: Callable[Concatenate[Any, P], AsyncIterator[T]]) -> None:
        self.__doc__ = method.__doc__
        self._name = method.__name__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> _BlockingIter[P, T]: ...
    @overload
    def __get__(self, obj: _Resource, owner: type[Any]) -> Callable[P, Iterator[T]]: ...
    def __get__(
        self, obj: _Resource | None, owner: type[Any]
    ) -> _BlockingIter[P, T] | Callable[P, Iterator[T]]:
        if obj is None:
            return self
        method = getattr(obj._target, self._name)
        runner = obj._runner

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
            agen: AsyncIterator[T] = method(*args, **kwargs)

            async def step() -> T:
                return await agen.__anext__()

            try:
                while True:
                    try:
                        item = runner.run(step())
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                close = getattr(agen, "aclose", None)
                if close is not None:
                    runner.run(close())

        return call


class SyncVms(_Resource):
    __doc__ = Vms.__doc__
    list = _Blocking(Vms.list)
    get = _Blocking(Vms.get)
    create = _Blocking(Vms.create)
    update = _Blocking(Vms.update)
    plan = _Blocking(Vms.plan)
    start = _Blocking(Vms.start)
    stop = _Blocking(Vms.stop)
    pause = _Blocking(Vms.pause)
    resume = _Blocking(Vms.resume)
    reboot = _Blocking(Vms.reboot)
    delete = _Blocking(Vms.delete)
    migrate = _Blocking(Vms.migrate)
    plan_migration = _Blocking(Vms.plan_migration)
    cancel_migration = _Blocking(Vms.cancel_migration)


class SyncHosts(_Resource):
    __doc__ = Hosts.__doc__
    list = _Blocking(Hosts.list)
    get = _Blocking(Hosts.get)
    update = _Blocking(Hosts.update)
    evacuate = _Blocking(Hosts.evacuate)
    confirm_down = _Blocking(Hosts.confirm_down)
    forget = _Blocking(Hosts.forget)
    pending = _Blocking(Hosts.pending)
    accept = _Blocking(Hosts.accept)
    join_token = _Blocking(Hosts.join_token)
    power = _Blocking(Hosts.power)
    set_power = _Blocking(Hosts.set_power)


class SyncOperations(_Resource):
    __doc__ = Operations.__doc__
    get = _Blocking(Operations.get)
    list = _Blocking(Operations.list)
    iterate = _BlockingIter(Operations.iterate)
    cancel = _Blocking(Operations.cancel)
    wait = _Blocking(Operations.wait)
    follow = _BlockingIter(Operations.follow)
    continue_host = _Blocking(Operations.continue_host)


class SyncActions(_Resource):
    __doc__ = Actions.__doc__
    start = _Blocking(Actions.start)
    plan = _Blocking(Actions.plan)


class SyncRolling(_Resource):
    __doc__ = Rolling.__doc__
    start = _Blocking(Rolling.start)
    plan = _Blocking(Rolling.plan)


class SyncEvents(_Resource):
    __doc__ = Events.__doc__
    list = _Blocking(Events.list)
    history = _BlockingIter(Events.history)
    follow = _BlockingIter(Events.follow)


class SyncPower(_Resource):
    __doc__ = Power.__doc__
    status = _Blocking(Power.status)
    set_mode = _Blocking(Power.set_mode)
    plan = _Blocking(Power.plan)
    apply = _Blocking(Power.apply)


class SyncTokens(_Resource):
    __doc__ = Tokens.__doc__
    create = _Blocking(Tokens.create)
    list = _Blocking(Tokens.list)
    revoke = _Blocking(Tokens.revoke)


class SyncAudit(_Resource):
    __doc__ = Audit.__doc__
    list = _Blocking(Audit.list)


class Client:
    """The blocking twin of :class:`~controller.client.aio.AsyncClient` (same arguments)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        verbose: bool = False,
    ) -> None:
        """Raises ``OSError`` or ``ssl.SSLError`` when ``ca_file`` cannot be read as a CA certificate."""
        self._async = AsyncClient(
            url, token=token, ca_file=ca_file, timeout=timeout, retries=retries, verbose=verbose
        )
        self._runner = asyncio.Runner()
        self.url = self._async.url
        a, run = self._async, self._runner
        self.vms = SyncVms(run, a.vms)
        self.hosts = SyncHosts(run, a.hosts)
        self.operations = SyncOperations(run, a.operations)
        self.actions = SyncActions(run, a.actions)
        self.rolling = SyncRolling(run, a.rolling)
        self.events = SyncEvents(run, a.events)
        self.power = SyncPower(run, a.power)
        self.tokens = SyncTokens(run, a.tokens)
        self.audit = SyncAudit(run, a.audit)

    @classmethod
    def from_env(cls, **kwargs: Any) -> Client:
        """A client configured as the CLI is: ``FLEETVISOR_URL``, ``FLEETVISOR_TOKEN``, ``FLEETVISOR_CA``."""
        return cls(**{**_env(), **kwargs})

    def health(self) -> dict[str, Any]:
        return self._runner.run(self._async.health())

    def close(self) -> None:
        """Close the connection pool and the event loop."""
        try:
            self._runner.run(self._async.aclose())
        finally:
            self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
