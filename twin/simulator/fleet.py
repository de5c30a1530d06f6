"""A fleet of simulated devices: registered by an installer over gRPC, enrolled a few at a
time, then all running at once until told to stop, their doings counted in one place.

Each device gets an id and serial number of the run (`sim-{run}-lamp-0001`, `SIM-{RUN}-L0001`)
and the label `simulation={run}` besides the run's own labels, so a run's devices can be
selected (`--filter simulation=...`) and a second run against the same service never collides
with the first. The run id is random; the seed only decides behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

import aiocoap
import grpc

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from citytwin.v1 import provisioning_pb2_grpc
from twin.coap_tls import client_ssl_context, device_client_context
from twin.simulator.devices import (
    Behaviour,
    Endpoint,
    EnrollmentFailed,
    FleetCounters,
    Installer,
    Kind,
    Registration,
    SimulatedDevice,
)

log = logging.getLogger(__name__)

RUN_LABEL: Final = "simulation"
DEFAULT_ENROLL_CONCURRENCY: Final = 8
# Once stopped, devices get this long to close their connections before they are cancelled.
SHUTDOWN_SECONDS: Final = 10.0
CALL_TIMEOUT_SECONDS: Final = 30.0
# Problems worth showing are few and repetitive: keep the first distinct ones.
MAX_PROBLEMS: Final = 5
_KIND_PROTO: Final[Mapping[Kind, d.DeviceKind.ValueType]] = {
    Kind.LAMP: d.LAMP,
    Kind.SENSOR: d.SENSOR,
    Kind.CAMERA: d.CAMERA,
}
# Refusals that every other enrollment of the run would meet too.
_FATAL_STATUSES: Final = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def new_run_id() -> str:
    """A short random id for a run (six hex digits)."""
    return secrets.token_hex(3)


@dataclass(frozen=True)
class FleetPlan:
    """Which devices a run simulates, with which extra labels and seed."""

    lamps: int = 0
    sensors: int = 0
    cameras: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    run_id: str = field(default_factory=new_run_id)
    enroll_concurrency: int = DEFAULT_ENROLL_CONCURRENCY

    def __post_init__(self) -> None:
        if min(self.lamps, self.sensors, self.cameras) < 0:
            raise ValueError("device counts must not be negative")
        if self.enroll_concurrency < 1:
            raise ValueError("enroll_concurrency must be at least 1")

    @property
    def total(self) -> int:
        """How many devices the run has."""
        return self.lamps + self.sensors + self.cameras

    def members(self) -> list[tuple[Kind, int]]:
        """(kind, number from 1) of every device, lamps first."""
        counts = ((Kind.LAMP, self.lamps), (Kind.SENSOR, self.sensors), (Kind.CAMERA, self.cameras))
        return [(kind, number) for kind, count in counts for number in range(1, count + 1)]

    def device_labels(self) -> dict[str, str]:
        """The labels every device of the run gets."""
        return {**self.labels, RUN_LABEL: self.run_id}


def device_identity(run_id: str, kind: Kind, number: int) -> tuple[str, str]:
    """(device id, serial number) of device `number` of `kind` in run `run_id`."""
    device_id = f"sim-{run_id}-{kind.value}-{number:04d}"
    serial = f"SIM-{run_id.upper()}-{kind.value[0].upper()}{number:04d}"
    return device_id, serial


def device_seed(seed: int, kind: Kind, number: int) -> str:
    """The seed of one device's random choices: the same run seed gives every device the
    same behaviour again, and different devices different behaviour."""
    return f"{seed}/{kind.value}/{number}"


class GrpcInstaller:
    """An installer on the ProvisioningService: each enrollment is a CreateEnrollment call
    with the given token (installer or admin). Use as an async context manager (it owns a
    grpc.aio channel, which belongs to the running event loop)."""

    def __init__(self, address: str, token: str, tls_ca_pem: bytes | None = None) -> None:
        if tls_ca_pem is None:
            self._channel = grpc.aio.insecure_channel(address)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca_pem)
            self._channel = grpc.aio.secure_channel(address, credentials)
        self._stub = provisioning_pb2_grpc.ProvisioningServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    async def create_enrollment(self, registration: Registration) -> str:
        """Register the device and return its one-time code. EnrollmentFailed if refused,
        fatal for refusals that no other device would escape (token, role, scope, labels)."""
        request = p.CreateEnrollmentRequest(
            device_id=registration.device_id,
            device=d.Device(
                kind=_KIND_PROTO[registration.kind],
                model=registration.model,
                serial_number=registration.serial,
                labels=dict(registration.labels),
            ),
        )
        try:
            response = await self._stub.CreateEnrollment(
                request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise EnrollmentFailed(
                f"CreateEnrollment {registration.device_id}: "
                f"{error.code().name}: {error.details()}",
                fatal=error.code() in _FATAL_STATUSES,
            ) from None
        return response.enrollment_code

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def __aenter__(self) -> GrpcInstaller:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class Fleet:
    """The devices of one run. `run` enrolls them (at most `plan.enroll_concurrency` at a
    time, each starting its life as soon as it has its certificate) and runs them until
    `stop` is set; `counters` says how they are doing at any moment."""

    def __init__(
        self, plan: FleetPlan, behaviour: Behaviour, endpoint: Endpoint, installer: Installer
    ) -> None:
        self.plan = plan
        self.behaviour = behaviour
        self.endpoint = endpoint
        self.installer = installer
        self.counters = FleetCounters(devices=plan.total)
        # The first few distinct problems, for people; `fatal` ended the run.
        self.problems: list[str] = []
        self.fatal: str | None = None
        self.devices: list[SimulatedDevice] = []
        for kind, number in plan.members():
            device_id, serial = device_identity(plan.run_id, kind, number)
            self.devices.append(
                SimulatedDevice(
                    kind=kind,
                    device_id=device_id,
                    serial=serial,
                    seed=device_seed(plan.seed, kind, number),
                    behaviour=behaviour,
                    endpoint=endpoint,
                    counters=self.counters,
                )
            )

    @property
    def enrollment_finished(self) -> bool:
        """Whether every device has enrolled or failed to."""
        return self.counters.enrolled + self.counters.enroll_failed >= self.counters.devices

    def of_kind(self, kind: Kind) -> list[SimulatedDevice]:
        """The devices of one kind, in number order."""
        return [device for device in self.devices if device.kind is kind]

    async def run(self, stop: asyncio.Event) -> None:
        """Enroll and run every device until `stop` is set (or every device has ended: all
        failed to enroll, or were refused). A fatal enrollment failure sets `fatal` and
        `stop`. Returns once the devices have disconnected."""
        anonymous = await device_client_context(client_ssl_context(self.endpoint.trust_pem))
        enroller = _SharedEnroller(anonymous, len(self.devices))
        slots = asyncio.Semaphore(self.plan.enroll_concurrency)
        tasks = [
            asyncio.create_task(self._live(dev, stop, slots, enroller)) for dev in self.devices
        ]
        stopped = asyncio.ensure_future(stop.wait())
        try:
            if tasks:
                all_ended = asyncio.ensure_future(asyncio.wait(tasks))
                await asyncio.wait({stopped, all_ended}, return_when=asyncio.FIRST_COMPLETED)
                all_ended.cancel()
                _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_SECONDS)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        finally:
            stopped.cancel()
            # Only left running if `run` itself was cancelled; they still get to close.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await enroller.close()

    async def _live(
        self,
        device: SimulatedDevice,
        stop: asyncio.Event,
        slots: asyncio.Semaphore,
        enroller: _SharedEnroller,
    ) -> None:
        try:
            async with slots:
                if stop.is_set():
                    return
                await device.enroll(self.installer, enroller.context, self.plan.device_labels())
        except EnrollmentFailed as failed:
            self.counters.enroll_failed += 1
            self._problem(str(failed))
            if failed.fatal and self.fatal is None:
                self.fatal = str(failed)
                stop.set()
            return
        except Exception as error:
            self.counters.enroll_failed += 1
            self._failed(device, error)
            return
        finally:
            await enroller.done()
        try:
            await device.run(stop)
        except Exception as error:
            self._failed(device, error)

    def _failed(self, device: SimulatedDevice, error: Exception) -> None:
        # A bug in one device must not end the others' run; it is shown and logged.
        log.exception("%s failed", device.device_id)
        self._problem(f"{device.device_id}: {type(error).__name__}: {error}")

    def _problem(self, text: str) -> None:
        if text not in self.problems and len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)


class _SharedEnroller:
    """The one anonymous TLS client every enrollment goes through, closed as soon as the last
    device has had its turn (an idle connection would only be closed by the server later)."""

    def __init__(self, context: aiocoap.Context, users: int) -> None:
        self.context = context
        self._users = users
        self._closed = False

    async def done(self) -> None:
        self._users -= 1
        if self._users <= 0:
            await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.context.shutdown()
