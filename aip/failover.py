"""Several hubs serving one fleet, used by a controller as one link.

Every device dials every hub (``aip.device.serve_hubs``), so any hub can
carry a batch to any device, and a hub that dies takes no device out of
reach: its batches are sent again, the same frame, through another hub, and
the device's call memory answers what already ran there (it is kept per
controller credential, which every hub of the fleet reads from the same
credentials file). Nothing runs between the hubs: no protocol of our own,
no shared state but the credentials.

``FailoverLink`` has the ``HubLink`` interface. It sends through the hub a
device was last reached through (else the first hub that takes the frame),
remembers which hub carried each batch still out, and when a hub's
connection ends tells its listener which batches were lost with it
(``LinkLost.batches``): those are sent again, the others wait for their
answers. A hub that answers that it has no such device (a device still
reconnecting to a hub that restarted) makes the next send for that device
try the next hub.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .access import CONTROLLER_PATH
from .connect import DEFAULT_MAX_MESSAGE_BYTES, HubRefused, HubUnavailable, hub_urls, safe_url
from .controller import FrameListener, HubLink, LinkLost, LossListener, list_devices
from .messages import ClientMessage, ClientMessageType, ServerMessage, ServerMessageType
from .switchboard import Reason

__all__ = [
    "MAX_REASON_CHARS",
    "QUICK_OPEN",
    "REMEMBERED_DEVICES",
    "FailoverLink",
    "Fleet",
    "controller_link",
    "list_fleet",
]

logger = logging.getLogger("aip.failover")

#: How much of a hub's reason for not listing its devices is kept (it is printed; the hub may be anyone's).
MAX_REASON_CHARS = 300
#: Devices whose hub is remembered; the least recently used is forgotten first (it then takes the default hub).
REMEMBERED_DEVICES = 10_000

#: How long a first try waits for a hub to answer its handshake before trying the next (a hung hub answers
#: never); a hub none answered in time gets the whole open_timeout on the second round.
QUICK_OPEN = 3.0

#: What to do with the link to hub number N (open it, send a frame through it); True: the quick first round.
_Use = Callable[[int, bool], Awaitable[None]]


def _ignore(*_: object) -> None:
    return None


class FailoverLink:
    """One controller's links to every hub of a fleet, opened as needed, used as one ``HubLink``."""

    def __init__(self, links: Sequence[HubLink]) -> None:
        if not links:
            raise ValueError("a FailoverLink needs at least one hub")
        self.links = list(links)
        #: The hub a batch for a device not remembered goes through first: the last one that took a frame.
        self._default = 0
        #: Which hub carried each batch still out (by response_id), so its loss names only those.
        self._routes: dict[str, int] = {}
        self._targets: dict[str, str] = {}
        self._device_hub: OrderedDict[str, int] = OrderedDict()
        #: Batches whose frame is on its way now: a loss meanwhile is the send's to handle (it tries the next hub).
        self._sending: set[str] = set()
        #: How often each hub's connection has been lost: a send that saw a loss begin is not counted as delivered.
        self._losses = [0] * len(self.links)
        self._on_frame: FrameListener = _ignore
        self._on_lost: LossListener = _ignore

    def __repr__(self) -> str:
        return f"FailoverLink([{', '.join(repr(safe_url(link.url)) for link in self.links)}], token=<hidden>)"

    @property
    def carrying(self) -> int:
        """How many batches are out through one hub or another: what a loss could name (bounded by what is sent)."""
        return len(self._routes)

    @property
    def latency(self) -> float:
        return self.links[self._default].latency

    def attach(self, on_frame: FrameListener, on_lost: LossListener) -> None:
        for index, link in enumerate(self.links):
            link.attach(functools.partial(self._frame, index), functools.partial(self._lost, index))
        self._on_frame, self._on_lost = on_frame, on_lost

    async def open(self) -> None:
        """Connect to the first hub that answers; ``HubUnavailable`` naming each failure if none does."""

        async def connect(index: int, quick: bool) -> None:
            await self.links[index].open(QUICK_OPEN if quick else None)

        await self._through(self._default, connect)

    async def send(self, message: ServerMessage) -> None:
        """Send through the device's hub, else the next that takes it; ``HubUnavailable`` if none does.

        A cancel (``task_end``) goes through the hub that carried its batch.
        """
        target, response_id = message.target_id or "", message.response_id or ""
        first = self._device_hub.get(target, self._default) if target else self._default
        if message.type is ServerMessageType.TASK_END:
            first = self._routes.get(response_id, first)
            self._forget(response_id)
        tracked = bool(target and response_id and message.type is ServerMessageType.COMMAND)

        async def through(index: int, quick: bool) -> None:
            link = self.links[index]
            if not link.connected:
                await link.open(QUICK_OPEN if quick else None)
            losses = self._losses[index]
            if tracked:
                self._routes[response_id], self._targets[response_id] = index, target
                self._sending.add(response_id)
            try:
                await link.send(message)
            finally:
                self._sending.discard(response_id)
            if self._losses[index] != losses:  # lost while the frame was on its way: it may not have arrived
                raise HubUnavailable(f"the connection to {safe_url(link.url)} was lost while sending")

        try:
            index = await self._through(first, through)
        except HubUnavailable:
            self._forget(response_id)
            raise
        if tracked:
            self._remember(target, index)

    async def _through(self, first: int, use: _Use) -> int:
        """``use`` each link from ``first`` on until one works (a quick round, then a patient one); its index.

        A hub that refuses our credential is skipped like one that is down:
        its copy of the credentials file may lag the others'. Only when every
        hub refuses is the refusal the answer.
        """
        failures: list[str] = []
        refusals: list[HubRefused] = []
        count = len(self.links)
        for quick in (True, False):
            failures.clear()
            refusals.clear()
            for step in range(count):
                index = (first + step) % count
                try:
                    await use(index, quick)
                except HubRefused as refused:
                    refusals.append(refused)
                    failures.append(str(refused))
                    continue
                except HubUnavailable as error:
                    failures.append(str(error))  # names the hub
                    continue
                self._default = index
                return index
            if len(refusals) == count:
                break  # nothing a longer wait would change
        if len(refusals) == count:
            raise refusals[0]
        raise HubUnavailable("no hub could be reached: " + "; ".join(failures))

    def _frame(self, index: int, message: ClientMessage) -> None:
        response_id = message.prev_response_id or ""
        if message.type in (ClientMessageType.COMMAND_RESULTS, ClientMessageType.ERROR):
            target = self._targets.get(response_id)
            unavailable = (message.metadata or {}).get("reason") == Reason.DEVICE_UNAVAILABLE
            if target is not None and unavailable and self._device_hub.get(target) == index:
                self._remember(target, (index + 1) % len(self.links))  # the next try asks another hub
            self._forget(response_id)  # answered, whichever hub's answer came first: a re-send tracks it anew
        self._on_frame(message)

    def _lost(self, index: int, error: HubUnavailable) -> None:
        """Hub ``index``'s connection ended: what it carried is lost, and new batches go elsewhere first."""
        self._losses[index] += 1
        lost = frozenset(
            response_id
            for response_id, via in self._routes.items()
            if via == index and response_id not in self._sending  # a frame on its way: its send tries the next hub
        )
        for response_id in lost:
            self._forget(response_id)
        for device in [device for device, via in self._device_hub.items() if via == index]:
            del self._device_hub[device]
        if self._default == index:
            self._default = (index + 1) % len(self.links)
        logger.info("lost %s (%s); %d batches to send again", safe_url(self.links[index].url), error, len(lost))
        self._on_lost(LinkLost(str(error), lost))

    def _remember(self, device: str, index: int) -> None:
        self._device_hub[device] = index
        self._device_hub.move_to_end(device)
        if len(self._device_hub) > REMEMBERED_DEVICES:
            self._device_hub.popitem(last=False)

    def _forget(self, response_id: str) -> None:
        self._routes.pop(response_id, None)
        self._targets.pop(response_id, None)

    async def close(self) -> None:
        for link in self.links:
            await link.close()

    async def __aenter__(self) -> FailoverLink:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def controller_link(
    hub_url: str,
    token: str | None = None,
    *,
    open_timeout: float = 10.0,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ssl_context: ssl.SSLContext | None = None,
) -> HubLink | FailoverLink:
    """A ``HubLink`` to the hub ``hub_url`` names, or a ``FailoverLink`` over several (``ws://a,ws://b``)."""
    links = [
        HubLink(url, token, open_timeout=open_timeout, max_message_bytes=max_message_bytes, ssl_context=ssl_context)
        for url in hub_urls(hub_url, CONTROLLER_PATH)
    ]
    return links[0] if len(links) == 1 else FailoverLink(links)


@dataclass
class Fleet:
    """The devices of every hub, each listed once with the hubs it is connected to (``hubs``, in the order named)."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    #: The hubs that could not be asked, and why.
    unreachable: dict[str, str] = field(default_factory=dict)


async def list_fleet(
    hub_url: str, token: str | None, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None
) -> Fleet:
    """Ask every hub ``hub_url`` names at once for its devices; merge by id (the first hub's entry is kept).

    A hub that cannot be asked, refuses us, or answers with something that
    is not a device list is named in ``unreachable`` (its reason cut to
    ``MAX_REASON_CHARS``); an entry without a string id is listed as it came,
    merged with nothing. When no hub answers, the one hub's error is raised,
    or one naming them all.
    """
    urls = hub_urls(hub_url, CONTROLLER_PATH)
    answers = await asyncio.gather(
        *(list_devices(url, token, timeout, ssl_context) for url in urls), return_exceptions=True
    )
    fleet = Fleet()
    by_id: dict[str, dict[str, Any]] = {}
    odd: list[dict[str, Any]] = []
    for url, answer in zip(urls, answers, strict=True):
        where = safe_url(url)
        if isinstance(answer, HubUnavailable | TimeoutError):
            reason = str(answer) or "no answer in time"
            fleet.unreachable[where] = reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "…"
            continue
        if isinstance(answer, BaseException):
            raise answer
        if not isinstance(answer, list):
            fleet.unreachable[where] = "its answer holds no list of devices"
            continue
        for entry in answer:
            entry = entry if isinstance(entry, dict) else {"id": entry}  # an id alone, as a plainer hub may list it
            key = entry.get("id")
            if isinstance(key, str):
                by_id.setdefault(key, {**entry, "hubs": []})["hubs"].append(where)
            else:  # no id to merge by: listed as it came, on its own
                odd.append({**entry, "hubs": [where]})
    if len(fleet.unreachable) == len(urls):
        only = answers[0]
        if len(urls) == 1 and isinstance(only, Exception):
            raise only
        raise HubUnavailable("no hub answered: " + "; ".join(f"{url}: {why}" for url, why in fleet.unreachable.items()))
    fleet.devices = [*by_id.values(), *odd]
    return fleet
