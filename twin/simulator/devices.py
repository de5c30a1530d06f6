"""One simulated device: a lamp, an environmental sensor or a camera that talks to the service
exactly as a real one would, over CoAP with aiocoap.

Its life: make a P-256 key and a CSR carrying its serial number and the installer's one-time
code, enroll over `coaps+tcp` (EST-coaps `sen`), then connect with its new certificate, observe
`/twin/desired`, report its whole state, and from then on:

* apply every desired change at once and report the result (a lamp switches and dims and its
  power draw follows; a camera starts or stops recording; a sensor adopts its report interval);
* every interval, bring its state up to date (a lit lamp's energy meter runs; faults are raised
  with probability `fault_rate` and clear again later) and report what changed; a sensor also
  posts its measurements as SenML to `/twin/telemetry`; a device with nothing to say sends a
  heartbeat instead, so it stays online;
* with probability `offline_rate` per interval, drop its connection and stay silent for a while,
  then reconnect and catch up (the first answer of the new observation is the current desired
  state, so nothing set meanwhile is missed).

What the device does is decided by the pure functions in the first half of this module (state
in, new state out, randomness from the `random.Random` passed in), so a seed makes a device's
behaviour repeatable and the rules are tested without a server. Only keys are never seeded:
they come from the operating system, as a real device's do.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final, Protocol

import aiocoap
import aiocoap.error
import aiocoap.util
import cbor2
from aiocoap.numbers.codes import Code
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from twin.coap_tls import client_ssl_context, device_client_context
from twin.delta import compute_delta
from twin.merge_patch import JSON, Document, apply_merge_patch, clone, json_equal

log = logging.getLogger(__name__)

# Content-formats (RFC 7252 registry) the device uses.
CBOR: Final = 60
SENML_CBOR: Final = 112
PKCS7_CERTS_ONLY: Final = 281
PKCS10: Final = 286
PKIX_CERT: Final = 287

EST_CRTS: Final = "/.well-known/est/crts"
EST_SEN: Final = "/.well-known/est/sen"
COAP_PORT: Final = 5683
COAPS_PORT: Final = 5684

# A request without an answer by then is taken as a lost connection.
REQUEST_TIMEOUT_SECONDS: Final = 15.0
# Reconnection attempts back off exponentially up to this, with jitter so that a fleet cut off
# by a server restart does not come back in lockstep.
MAX_BACKOFF_SECONDS: Final = 30.0
# An enrollment is tried this often when the network or the server fails transiently.
ENROLL_ATTEMPTS: Final = 3
# A raised fault clears on each later report with this probability (four reports on average).
FAULT_CLEAR_PROBABILITY: Final = 0.25
# The length of an offline period, in intervals, when none is given.
DEFAULT_OFFLINE_INTERVALS: Final = 5.0
# Reports are spread over +-10% of the interval, so that devices started together do not stay
# synchronised.
_JITTER: Final = 0.1


class Kind(StrEnum):
    """The kinds of device the simulator can play, each with one built-in model."""

    LAMP = "lamp"
    SENSOR = "sensor"
    CAMERA = "camera"


MODELS: Final[Mapping[Kind, str]] = {
    Kind.LAMP: "lamp-led-dimmable",
    Kind.SENSOR: "env-sensor",
    Kind.CAMERA: "camera-ip",
}
FIRMWARE: Final[Mapping[Kind, str]] = {
    Kind.LAMP: "2.0.3",
    Kind.SENSOR: "1.8.0",
    Kind.CAMERA: "4.2.1",
}
# The fault flags (under `faults.`) each kind's profile declares.
FAULTS: Final[Mapping[Kind, tuple[str, ...]]] = {
    Kind.LAMP: ("driver_failure", "lamp_failure"),
    Kind.SENSOR: ("calibration_error",),
    Kind.CAMERA: ("storage_failure",),
}
# Vendor codes a lamp lists in `fault_codes` while the matching flag is raised.
LAMP_FAULT_CODES: Final[Mapping[str, str]] = {
    "driver_failure": "DRV-01",
    "lamp_failure": "LED-02",
}
_LAMP_RATINGS_W: Final = (40.0, 60.0, 80.0, 100.0, 150.0)

Readings = dict[str, float | bool]

# Sensor measurements that wander: (typical low, typical high, largest step per report). The
# band lies within the profile's limits.
_MEASUREMENTS: Final[Mapping[str, tuple[float, float, float]]] = {
    "pm2_5": (2.0, 80.0, 3.0),
    "pm10": (5.0, 150.0, 5.0),
    "no2": (5.0, 200.0, 8.0),
    "noise_db": (35.0, 95.0, 4.0),
}
# SenML units (RFC 8428 section 12.1); %EL is a battery's remaining charge.
_UNITS: Final[Mapping[str, str]] = {
    "pm2_5": "ug/m3",
    "pm10": "ug/m3",
    "no2": "ug/m3",
    "noise_db": "dB",
    "battery": "%EL",
    "energy.total_wh": "Wh",
    "energy.power_w": "W",
}
_PARKING_FLIP_PROBABILITY: Final = 0.15
_BATTERY_DRAIN_PER_REPORT: Final = 0.02
# RFC 8428 section 6: CBOR labels of the SenML fields the device sends.
_SENML_CBOR_LABELS: Final[Mapping[str, int]] = {"bt": -3, "n": 0, "u": 1, "v": 2, "vb": 4}


# --- behaviour: pure functions -------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """How every device of a run behaves: its report interval (seconds), the probability of
    raising a fault and of going offline at each report, and the mean length of an offline
    period (seconds; 0 means five intervals)."""

    interval: float = 10.0
    fault_rate: float = 0.0
    offline_rate: float = 0.0
    offline_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"the interval must be positive, not {self.interval}")
        for name in ("fault_rate", "offline_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} is a probability between 0 and 1, not {rate}")
        if self.offline_seconds < 0:
            raise ValueError(f"offline_seconds must not be negative, not {self.offline_seconds}")

    @property
    def mean_offline_seconds(self) -> float:
        """The mean length of an offline period."""
        return self.offline_seconds or DEFAULT_OFFLINE_INTERVALS * self.interval


@dataclass(frozen=True)
class DeviceState:
    """What a device is, as plain data. `actual` is its state as it reports it (a reported
    document); `at` is when that was last brought up to date (monotonic seconds). A lamp draws
    `rated_power_w` at full brightness; a sensor's latest measurements are in `readings`
    (they reach the twin through telemetry, not through reports)."""

    kind: Kind
    actual: Document
    at: float
    rated_power_w: float = 0.0
    readings: Readings = field(default_factory=dict)


@dataclass(frozen=True)
class Tick:
    """The outcome of one report interval: the new state and the faults raised and cleared."""

    state: DeviceState
    raised: tuple[str, ...] = ()
    cleared: tuple[str, ...] = ()


def new_state(kind: Kind, rng: random.Random, now: float) -> DeviceState:
    """A freshly installed device: firmware, no faults, and a kind-specific starting state."""
    faults: Document = {name: False for name in FAULTS[kind]}
    actual: Document = {"firmware": {"version": FIRMWARE[kind]}, "faults": faults}
    rated = 0.0
    readings: Readings = {}
    if kind is Kind.LAMP:
        rated = rng.choice(_LAMP_RATINGS_W)
        actual.update(
            power=rng.random() < 0.5,
            brightness=rng.randrange(0, 101, 10),
            energy={"total_wh": round(rng.uniform(0, 50_000), 1), "power_w": 0.0},
            fault_codes=[],
        )
    elif kind is Kind.CAMERA:
        actual.update(
            recording=True,
            stream_profile="medium",
            resolution="1080p",
            privacy_mask=False,
            storage_health="ok",
        )
    else:
        readings = {
            name: round(rng.uniform(low, (low + high) / 2), 1)
            for name, (low, high, _) in _MEASUREMENTS.items()
        }
        readings["parking_occupied"] = rng.random() < 0.5
        readings["battery"] = round(rng.uniform(60.0, 100.0), 2)
    state = DeviceState(kind, actual, now, rated, readings)
    return replace(state, actual=_derived(state))


def advance(state: DeviceState, now: float) -> DeviceState:
    """The state at `now`: a lamp's energy meter has counted its draw since `state.at`."""
    elapsed = max(0.0, now - state.at)
    if state.kind is not Kind.LAMP or elapsed == 0.0:
        return replace(state, at=max(now, state.at))
    energy = _object(state.actual.get("energy"))
    draw = _number(energy.get("power_w"))
    total = _number(energy.get("total_wh")) + draw * elapsed / 3600.0
    actual = apply_merge_patch(state.actual, {"energy": {"total_wh": round(total, 4)}})
    return replace(state, actual=actual, at=now)


def follow_desired(state: DeviceState, desired: Document, now: float) -> DeviceState:
    """The state after applying `desired`: every desired value the device does not have yet
    is taken over (the service has already checked it against the profile), and what depends
    on it follows (a lamp's draw). Unchanged if the device already is as desired."""
    current = advance(state, now)
    change = compute_delta(desired, current.actual)
    if not change:
        return current
    changed = replace(current, actual=apply_merge_patch(current.actual, change))
    return replace(changed, actual=_derived(changed))


def next_reported(state: DeviceState, now: float, rng: random.Random, fault_rate: float) -> Tick:
    """One report interval later: the energy meter has run, raised faults may have cleared
    (each with FAULT_CLEAR_PROBABILITY), and with probability `fault_rate` one more fault is
    raised. A sensor's measurements are `next_readings`' business."""
    current = advance(state, now)
    faults = dict(_object(current.actual.get("faults")))
    cleared = tuple(
        name
        for name in FAULTS[state.kind]
        if faults.get(name) is True and rng.random() < FAULT_CLEAR_PROBABILITY
    )
    for name in cleared:
        faults[name] = False
    quiet = [
        name for name in FAULTS[state.kind] if faults.get(name) is not True and name not in cleared
    ]
    raised: tuple[str, ...] = ()
    if quiet and rng.random() < fault_rate:
        raised = (rng.choice(quiet),)
        faults[raised[0]] = True
    if not raised and not cleared:
        return Tick(current)
    changed = replace(current, actual=apply_merge_patch(current.actual, {"faults": faults}))
    return Tick(replace(changed, actual=_derived(changed)), raised, cleared)


def next_readings(readings: Readings, rng: random.Random) -> Readings:
    """A sensor's next measurements: pollution and noise wander within their usual bands, a
    parking bay is sometimes taken or freed, the battery drains slowly."""
    result: Readings = {}
    for name, (low, high, step) in _MEASUREMENTS.items():
        previous = _number(readings.get(name, (low + high) / 2))
        result[name] = round(min(high, max(low, previous + rng.uniform(-step, step))), 1)
    occupied = readings.get("parking_occupied") is True
    result["parking_occupied"] = (
        not occupied if rng.random() < _PARKING_FLIP_PROBABILITY else occupied
    )
    battery = _number(readings.get("battery", 100.0)) - _BATTERY_DRAIN_PER_REPORT
    result["battery"] = round(max(0.0, battery), 2)
    return result


def senml_pack(readings: Readings, at: float) -> list[dict[int, Any]]:
    """`readings` as a SenML pack (RFC 8428) with CBOR labels, all measured at `at` (seconds
    since the epoch). Each record is named after the profile property it measures."""
    pack: list[dict[int, Any]] = []
    for name, value in readings.items():
        record: dict[str, Any] = {"n": name}
        if isinstance(value, bool):
            record["vb"] = value
        else:
            record["v"] = value
            if name in _UNITS:
                record["u"] = _UNITS[name]
        if not pack:
            record["bt"] = at
        pack.append({_SENML_CBOR_LABELS[label]: item for label, item in record.items()})
    return pack


def document_diff(old: Document, new: Document) -> Document:
    """The merge patch (RFC 7396) that turns `old` into `new`: changed and new members, `null`
    for removed ones, objects recursively; `{}` if they are equal."""
    patch: Document = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = document_diff(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or not json_equal(before, value):
            patch[key] = clone(value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def offline_period(behaviour: Behaviour, rng: random.Random) -> float | None:
    """With probability `behaviour.offline_rate`, how long to go offline now (half to one and
    a half times the mean); otherwise None."""
    if behaviour.offline_rate <= 0.0 or rng.random() >= behaviour.offline_rate:
        return None
    return behaviour.mean_offline_seconds * rng.uniform(0.5, 1.5)


def report_interval(state: DeviceState, behaviour: Behaviour, rng: random.Random) -> float:
    """Seconds until the next report: the run's interval, or the sensor's own `report_interval`
    once its desired state set one, spread by +-10%."""
    interval = behaviour.interval
    own = state.actual.get("report_interval")
    if state.kind is Kind.SENSOR and isinstance(own, int | float) and not isinstance(own, bool):
        interval = float(own)
    return interval * rng.uniform(1.0 - _JITTER, 1.0 + _JITTER)


def _derived(state: DeviceState) -> Document:
    """`state.actual` with what follows from the rest brought in line: a lamp draws power only
    when it is on and healthy, and lists its fault codes; a camera's storage health."""
    actual = state.actual
    faults = _object(actual.get("faults"))
    if state.kind is Kind.LAMP:
        broken = any(faults.get(name) is True for name in FAULTS[Kind.LAMP])
        level = _number(actual.get("brightness", 100))
        lit = actual.get("power") is True and not broken
        draw = round(state.rated_power_w * level / 100.0, 1) if lit else 0.0
        codes: list[JSON] = [
            code for name, code in LAMP_FAULT_CODES.items() if faults.get(name) is True
        ]
        return apply_merge_patch(actual, {"energy": {"power_w": draw}, "fault_codes": codes})
    if state.kind is Kind.CAMERA:
        health = "failed" if faults.get("storage_failure") is True else "ok"
        return apply_merge_patch(actual, {"storage_health": health})
    return actual


def _object(value: JSON) -> Document:
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return 0.0


# --- keys, CSRs, the CA ---------------------------------------------------------------------


def new_device_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key, the kind the service's CSR policy accepts."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: ec.EllipticCurvePrivateKey,
    serial: str | None,
    code: str | None = None,
    common_name: str = "device",
) -> bytes:
    """A DER PKCS#10 request signed by `key`, with the serial number in the subject's
    serialNumber and the enrollment code, if any, as the challengePassword attribute."""
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if serial is not None:
        names.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if code is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, code.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM, as `client_ssl_context` takes it."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificates_pem(certs: list[x509.Certificate]) -> bytes:
    """Certificates as concatenated PEM."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """`HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT` as (host, port). ValueError if malformed."""
    try:
        host, port = aiocoap.util.hostportsplit(text.strip())
    except ValueError as error:
        raise ValueError(f"not HOST:PORT: {text!r}") from error
    if not host:
        raise ValueError(f"no host in {text!r}")
    port = default_port if port is None else int(port)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return str(host), port


def coap_uri(scheme: str, host: str, port: int, path: str) -> str:
    """`scheme://host:port/path`, with an IPv6 host in brackets."""
    return f"{scheme}://{aiocoap.util.hostportjoin(host, port)}{path}"


class SimulatorError(Exception):
    """Something the simulator cannot go on with; the message says what."""


class EnrollmentFailed(SimulatorError):
    """A device could not enroll. `fatal` means no other device will either (the token may not
    create enrollments, say), so the run should stop."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class DeviceRefused(SimulatorError):
    """The service refuses the device itself (revoked certificate, decommissioned, deleted):
    reconnecting will not help."""


class _ConnectionLost(Exception):
    """The connection failed or a request went unanswered; reconnect and carry on."""


async def fetch_ca_over_udp(host: str, port: int = COAP_PORT) -> bytes:
    """The fleet CA's certificates (PEM) from `coap://host:port/.well-known/est/crts`.

    Plain CoAP proves nothing about who answered: this is trust on first use, for test
    networks and demonstrations. A real device is given the CA, or the server's fingerprint,
    out of band. SimulatorError if there is no valid answer within REQUEST_TIMEOUT_SECONDS.
    """
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    uri = coap_uri("coap", host, port, EST_CRTS)
    try:
        message = aiocoap.Message(code=aiocoap.GET, uri=uri)
        response = await asyncio.wait_for(
            context.request(message).response, REQUEST_TIMEOUT_SECONDS
        )
    except (aiocoap.error.Error, OSError, TimeoutError) as error:
        raise SimulatorError(f"cannot fetch the CA from {uri}: {error or 'no answer'}") from None
    finally:
        await context.shutdown()
    if response.code != Code.CONTENT or response.opt.content_format != PKCS7_CERTS_ONLY:
        raise SimulatorError(f"{uri} answered {response.code} without the CA certificates")
    try:
        certs = pkcs7.load_der_pkcs7_certificates(response.payload)
    except ValueError:
        raise SimulatorError(f"{uri} answered with a malformed certificate bundle") from None
    return certificates_pem(certs)


# --- the device on the wire -----------------------------------------------------------------


@dataclass
class FleetCounters:
    """What a fleet's devices have done so far; each device adds to it (one event loop, no
    locks). `connected` and `offline` are the devices in that condition now. `reports_ok` and
    `reports_failed` count reported-state and telemetry POSTs alike (`telemetry` the latter
    alone); `disconnects` are connections lost or refused unexpectedly (not offline periods);
    `refused` devices were turned away for good (revoked, decommissioned) and stopped."""

    devices: int = 0
    enrolled: int = 0
    enroll_failed: int = 0
    connected: int = 0
    reports_ok: int = 0
    reports_failed: int = 0
    telemetry: int = 0
    heartbeats: int = 0
    desired_applied: int = 0
    faults_raised: int = 0
    faults_cleared: int = 0
    offline: int = 0
    offline_periods: int = 0
    disconnects: int = 0
    refused: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict, in declaration order."""
        return dict(vars(self))


@dataclass(frozen=True)
class Endpoint:
    """Where devices find the service: its `coaps+tcp` host and port, and the CA certificates
    (PEM) that its TLS certificate chains to."""

    host: str
    port: int
    trust_pem: bytes

    def uri(self, path: str) -> str:
        """The `coaps+tcp` URI of `path`."""
        return coap_uri("coaps+tcp", self.host, self.port, path)


@dataclass(frozen=True)
class Registration:
    """A device for an installer to register: what CreateEnrollment needs."""

    device_id: str
    kind: Kind
    model: str
    serial: str
    labels: Mapping[str, str]


class Installer(Protocol):
    """Whoever registers devices and hands out their one-time enrollment codes."""

    async def create_enrollment(self, registration: Registration) -> str:
        """Register the device and return its enrollment code; EnrollmentFailed if refused."""
        ...


class SimulatedDevice:
    """One device: enrolls once, then runs until told to stop (see the module docstring)."""

    def __init__(
        self,
        *,
        kind: Kind,
        device_id: str,
        serial: str,
        seed: str,
        behaviour: Behaviour,
        endpoint: Endpoint,
        counters: FleetCounters,
    ) -> None:
        self.kind = kind
        self.device_id = device_id
        self.serial = serial
        self.behaviour = behaviour
        self.endpoint = endpoint
        self.counters = counters
        self.rng = random.Random(seed)
        # Retry and backoff jitter depend on the network; drawing it from `rng` would make the
        # behaviour depend on it too.
        self._jitter = random.Random(f"{seed}/network")
        self.state = new_state(kind, self.rng, _now())
        self.certificate: x509.Certificate | None = None
        # The last state the service committed; what differs from it is the next report.
        self._committed: Document = {}
        self._tls: ssl.SSLContext | None = None

    async def enroll(
        self, installer: Installer, anonymous: aiocoap.Context, labels: Mapping[str, str]
    ) -> None:
        """Get an enrollment code from `installer`, then a certificate over `anonymous` (an
        aiocoap client trusting the service, presenting no certificate). EnrollmentFailed if
        either step fails."""
        registration = Registration(
            self.device_id, self.kind, MODELS[self.kind], self.serial, labels
        )
        code = await installer.create_enrollment(registration)
        key = new_device_key()
        csr = make_csr(key, self.serial, code, common_name=self.device_id)
        response = await self._post_csr(anonymous, csr)
        self.certificate = x509.load_der_x509_certificate(response.payload)
        self._tls = client_ssl_context(
            self.endpoint.trust_pem,
            cert_pem=self.certificate.public_bytes(serialization.Encoding.PEM),
            key_pem=key_pem(key),
        )
        self.counters.enrolled += 1

    async def _post_csr(self, anonymous: aiocoap.Context, csr: bytes) -> Any:
        problem = ""
        for attempt in range(ENROLL_ATTEMPTS):
            if attempt:
                await asyncio.sleep(attempt * self._jitter.uniform(0.5, 1.5))
            message = aiocoap.Message(
                code=aiocoap.POST,
                uri=self.endpoint.uri(EST_SEN),
                payload=csr,
                content_format=PKCS10,
                accept=PKIX_CERT,
            )
            try:
                response = await asyncio.wait_for(
                    anonymous.request(message).response, REQUEST_TIMEOUT_SECONDS
                )
            except (aiocoap.error.Error, OSError, TimeoutError) as error:
                problem = str(error) or "no answer"
                continue
            if response.code == Code.CHANGED:
                return response
            problem = f"{response.code}: {response.payload.decode(errors='replace')}"
            # 5.03 and 4.29 say "later"; anything else will not get better.
            if response.code not in (Code.SERVICE_UNAVAILABLE, Code.TOO_MANY_REQUESTS):
                break
        raise EnrollmentFailed(f"{self.device_id}: enrollment refused: {problem}")

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, follow the desired state and report until `stop` is set, going offline
        and reconnecting as the behaviour and the network have it. Returns early only if the
        service refuses the device. Call `enroll` first."""
        if self._tls is None:
            raise SimulatorError(f"{self.device_id} has not enrolled")
        tls = self._tls
        stopping = asyncio.ensure_future(stop.wait())
        failures = 0
        try:
            while not stop.is_set():
                try:
                    offline = await self._session(tls, stopping)
                except _ConnectionLost as lost:
                    failures += 1
                    self.counters.disconnects += 1
                    backoff = min(MAX_BACKOFF_SECONDS, 2.0 ** (failures - 1))
                    log.debug("%s: connection lost (%s)", self.device_id, lost)
                    await asyncio.wait({stopping}, timeout=backoff * self._jitter.uniform(0.5, 1.0))
                    continue
                except DeviceRefused as refused:
                    self.counters.refused += 1
                    log.info("%s: refused by the service: %s", self.device_id, refused)
                    return
                failures = 0
                if offline is None:
                    return
                self.counters.offline += 1
                self.counters.offline_periods += 1
                try:
                    await asyncio.wait({stopping}, timeout=offline)
                finally:
                    self.counters.offline -= 1
        finally:
            stopping.cancel()

    async def _session(self, tls: ssl.SSLContext, stopping: asyncio.Future[Any]) -> float | None:
        """One connection: observe the desired state, report, tick. Returns None once stopped,
        or how long to stay offline; _ConnectionLost or DeviceRefused otherwise."""
        context = await device_client_context(tls)
        observation: Any = None
        waiting: asyncio.Task[Any] | None = None
        connected = False
        loop = asyncio.get_running_loop()
        try:
            request = context.request(
                aiocoap.Message(
                    code=aiocoap.GET, uri=self.endpoint.uri("/twin/desired"), observe=0, accept=CBOR
                )
            )
            first = await self._answer(request.response)
            observation = request.observation
            connected = True
            self.counters.connected += 1
            await self._on_desired(context, first)
            await self._report(context)
            # One iterator for the whole observation: a new one would start over at the latest
            # notification.
            notifications = aiter(observation)
            due = loop.time() + report_interval(self.state, self.behaviour, self.rng)
            while True:
                if waiting is None:
                    waiting = asyncio.ensure_future(_next_notification(notifications))
                await asyncio.wait(
                    {waiting, stopping},
                    timeout=max(0.0, due - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stopping.done():
                    return None
                if waiting.done():
                    notification = await self._answer(waiting)
                    waiting = None
                    await self._on_desired(context, notification)
                if loop.time() >= due:
                    offline = await self._tick(context)
                    if offline is not None:
                        return offline
                    due = loop.time() + report_interval(self.state, self.behaviour, self.rng)
        finally:
            if waiting is not None:
                waiting.cancel()
            if observation is not None and not observation.cancelled:
                observation.cancel()
            if connected:
                self.counters.connected -= 1
            await context.shutdown()

    async def _on_desired(self, context: aiocoap.Context, notification: Any) -> None:
        """Apply a desired document (an observation's answer) and report what changed."""
        try:
            desired = cbor2.loads(notification.payload) if notification.payload else {}
        except (cbor2.CBORDecodeError, ValueError):
            log.warning("%s: undecodable desired state ignored", self.device_id)
            return
        if not isinstance(desired, dict):
            return
        # Counted only when the desired state asked for something new; repeated notifications
        # of the same desired state (such as the first after a reconnection) are not changes.
        asked = bool(compute_delta(desired, self.state.actual))
        self.state = follow_desired(self.state, desired, _now())
        if asked and await self._report(context):
            self.counters.desired_applied += 1

    async def _tick(self, context: aiocoap.Context) -> float | None:
        """One report interval: advance, report (telemetry too for a sensor, a heartbeat if
        there was nothing to say); then perhaps go offline (the returned duration)."""
        tick = next_reported(self.state, _now(), self.rng, self.behaviour.fault_rate)
        self.state = tick.state
        self.counters.faults_raised += len(tick.raised)
        self.counters.faults_cleared += len(tick.cleared)
        said = False
        if self.kind is Kind.SENSOR:
            readings = next_readings(self.state.readings, self.rng)
            self.state = replace(self.state, readings=readings)
            said = await self._telemetry(context, readings) or True
        elif self.kind is Kind.LAMP:
            # A lamp's meter goes out as telemetry, so the service keeps its history (energy
            # per district and day); the report then carries the rest.
            energy = _object(self.state.actual.get("energy"))
            meter: Readings = {
                "energy.total_wh": _number(energy.get("total_wh")),
                "energy.power_w": _number(energy.get("power_w")),
            }
            if await self._telemetry(context, meter):
                self._committed = apply_merge_patch(self._committed, {"energy": dict(energy)})
                said = True
        said = await self._report(context) or said
        if not said and await self._post(context, "/twin/heartbeat", b"", None, counted=False):
            self.counters.heartbeats += 1
        return offline_period(self.behaviour, self.rng)

    async def _telemetry(self, context: aiocoap.Context, readings: Readings) -> bool:
        """POST `readings` as SenML; True if the service committed them."""
        pack = senml_pack(readings, time.time())
        if not await self._post(context, "/twin/telemetry", cbor2.dumps(pack), SENML_CBOR):
            return False
        self.counters.telemetry += 1
        return True

    async def _report(self, context: aiocoap.Context) -> bool:
        """Report what changed since the last committed report, if anything; True if the
        service committed it."""
        patch = document_diff(self._committed, self.state.actual)
        if not patch:
            return False
        snapshot = self.state.actual
        if not await self._post(context, "/twin/reported", cbor2.dumps(patch), CBOR):
            return False
        self._committed = snapshot
        return True

    async def _post(
        self,
        context: aiocoap.Context,
        path: str,
        payload: bytes,
        content_format: int | None,
        *,
        counted: bool = True,
    ) -> bool:
        """POST and count the outcome as a report; True on success."""
        message = aiocoap.Message(code=aiocoap.POST, uri=self.endpoint.uri(path), payload=payload)
        if content_format is not None:
            message.opt.content_format = content_format
        try:
            await self._answer(context.request(message).response)
        except _ConnectionLost:
            if counted:
                self.counters.reports_failed += 1
            raise
        except _Rejected as rejected:
            if counted:
                self.counters.reports_failed += 1
            log.warning("%s: POST %s refused: %s", self.device_id, path, rejected)
            return False
        if counted:
            self.counters.reports_ok += 1
        return True

    async def _answer(self, pending: Any) -> Any:
        """The response `pending` brings, sorted into success, a rejection of the request
        (_Rejected), a refusal of the device (DeviceRefused) or a lost connection."""
        try:
            response = await asyncio.wait_for(pending, REQUEST_TIMEOUT_SECONDS)
        except (aiocoap.error.Error, OSError, TimeoutError) as error:
            raise _ConnectionLost(str(error) or type(error).__name__) from None
        if response is None:
            raise _ConnectionLost("the service ended the observation")
        if response.code.is_successful():
            return response
        detail = f"{response.code}: {response.payload.decode(errors='replace')}"
        if response.code in (Code.UNAUTHORIZED, Code.FORBIDDEN, Code.NOT_FOUND):
            raise DeviceRefused(detail)
        raise _Rejected(detail)


class _Rejected(Exception):
    """The service refused one request (e.g. 4.22 for a value outside the profile)."""


async def _next_notification(notifications: Any) -> Any:
    """The next notification, or None when the observation ended without an error (a Task
    cannot carry StopAsyncIteration)."""
    try:
        return await anext(notifications)
    except StopAsyncIteration:
        return None


def _now() -> float:
    # The clock asyncio's timeouts run on, so state times and report deadlines agree.
    return time.monotonic()
