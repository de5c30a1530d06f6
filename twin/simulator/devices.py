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
  state, so nothing set meanwhile is missed);
* follow the firmware job in its desired state (firmware_ota's device protocol): download the
  image block by block, resuming after a lost connection, check it (digest, manifest), install
  it and reboot, reporting each step; failures are injected at the behaviour's rates (see
  firmware_updates.py, where those decisions are made).

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import aiocoap
import aiocoap.error
import aiocoap.util
import cbor2
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from firmware_ota.suit_manifests import (
    CITYTWIN_VENDOR_DOMAIN,
    ManifestContent,
    VerifyingKey,
    class_id,
    read_envelope,
    vendor_id,
)
from twin.coap_tls import client_ssl_context, device_client_context
from twin.delta import compute_delta
from twin.errors import ArtifactRejected
from twin.merge_patch import JSON, Document, apply_merge_patch, clone, json_equal
from twin.simulator.firmware_updates import (
    FIRMWARE_MEMBER,
    Action,
    AlreadyRunning,
    Download,
    Firmware,
    ImageIdentity,
    InstallOutcome,
    Job,
    Keep,
    Reason,
    Refusal,
    Refuse,
    Update,
    Withdrawn,
    already_running,
    booted,
    check_image,
    decide,
    device_settings,
    downloaded,
    downloading,
    failed,
    forget_settled,
    image_identity,
    manifest_problem,
    plan_download,
    plan_install,
    progress,
    progress_due,
    resume_block,
    updating,
)

log = logging.getLogger(__name__)

# Content-formats (RFC 7252 registry) the device uses.
CBOR: Final = 60
SENML_CBOR: Final = 112
PKCS7_CERTS_ONLY: Final = 281
PKCS10: Final = 286
PKIX_CERT: Final = 287

EST_CRTS: Final = "/.well-known/est/crts"
EST_SEN: Final = "/.well-known/est/sen"
# The service's key for SUIT manifests (PEM SubjectPublicKeyInfo).
MANIFEST_KEY_PATH: Final = "/fw/manifest-key"
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
# How long a device is away while it reboots into new firmware, when not told otherwise.
DEFAULT_REBOOT_SECONDS: Final = 2.0
# Firmware is fetched in blocks of 2**(6 + 4) = 1024 bytes, the largest non-BERT Block2 size
# (RFC 7959 section 2.2), which every CoAP server takes.
BLOCK_SIZE_EXPONENT: Final = 6
# A corrupted download has one bit flipped, which its digest is sure to catch.
_CORRUPTION_MASK: Final = 0x01
# CoAP answers that say "come back later" (server errors, 4.29) rather than "never".
_SERVER_ERROR_CLASS: Final = 5
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
# Room for a firmware image in each kind's flash: a job for a larger image is refused.
STORAGE_BYTES: Final[Mapping[Kind, int]] = {
    Kind.LAMP: 1024 * 1024,
    Kind.SENSOR: 512 * 1024,
    Kind.CAMERA: 64 * 1024 * 1024,
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
    period (seconds; 0 means five intervals). Firmware updates fail at their rates: a
    download arrives corrupted (`fw_integrity_failure_rate`) or loses its connection part way
    (`fw_connection_loss_rate`); an installation fails (`fw_install_failure_rate`) or, after
    the reboot, the bootloader falls back to the old image (`fw_revert_rate`). A reboot keeps
    the device away for `reboot_seconds`."""

    interval: float = 10.0
    fault_rate: float = 0.0
    offline_rate: float = 0.0
    offline_seconds: float = 0.0
    fw_integrity_failure_rate: float = 0.0
    fw_connection_loss_rate: float = 0.0
    fw_install_failure_rate: float = 0.0
    fw_revert_rate: float = 0.0
    reboot_seconds: float = DEFAULT_REBOOT_SECONDS

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"the interval must be positive, not {self.interval}")
        rates = (
            "fault_rate",
            "offline_rate",
            "fw_integrity_failure_rate",
            "fw_connection_loss_rate",
            "fw_install_failure_rate",
            "fw_revert_rate",
        )
        for name in rates:
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} is a probability between 0 and 1, not {rate}")
        for name in ("offline_seconds", "reboot_seconds"):
            seconds = getattr(self, name)
            if seconds < 0:
                raise ValueError(f"{name} must not be negative, not {seconds}")

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
    on it follows (a lamp's draw). Unchanged if the device already is as desired. The firmware
    job is not a value to take over: the device follows it and reports on it on its own
    (`with_firmware`)."""
    current = advance(state, now)
    change = compute_delta(device_settings(desired), current.actual)
    if not change:
        return current
    changed = replace(current, actual=apply_merge_patch(current.actual, change))
    return replace(changed, actual=_derived(changed))


def with_firmware(state: DeviceState, report: Document) -> DeviceState:
    """The state reporting `report` as its whole `firmware` object (members it no longer has,
    such as a past failure's reason, are gone)."""
    return replace(state, actual={**state.actual, FIRMWARE_MEMBER: clone(report)})


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


class ConnectionLost(Exception):
    """The connection failed or a request went unanswered; reconnect and carry on."""


class FetchRefused(SimulatorError):
    """The service refused a firmware fetch (an image block, the manifest key) for good, or
    broke the block-wise protocol: the job fails for `refusal`."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal


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


async def download_image(
    context: aiocoap.Context,
    uri: str,
    image: bytearray,
    *,
    limit: int,
    after_block: Callable[[int], Awaitable[None]] | None = None,
    block_seconds: float = REQUEST_TIMEOUT_SECONDS,
) -> None:
    """Append the rest of the representation at `uri` to `image`, which holds its first bytes
    already, one Block2 request (RFC 7959) at a time from byte len(image) on: a download cut
    off by a lost connection resumes where it stopped. `after_block(length)` runs after each
    block is appended.

    ConnectionLost if a block goes unanswered within `block_seconds` or the service asks to come
    back later; FetchRefused if it refuses the request, answers with another block than the
    one asked for, or sends more than `limit` bytes in all.
    """
    while True:
        number, exponent = resume_block(len(image), BLOCK_SIZE_EXPONENT)
        message = aiocoap.Message(code=aiocoap.GET, uri=uri)
        message.opt.block2 = BlockOption.BlockwiseTuple(number, False, exponent)
        # aiocoap would assemble the blocks itself, always from the first one.
        response = await _fetched(
            context.request(message, handle_blockwise=False), block_seconds, urlsplit(uri).path
        )
        block = response.opt.block2
        more = block is not None and bool(block.more)
        start = 0 if block is None else block.start
        if start != len(image):
            raise FetchRefused(
                Refusal(Reason.INTEGRITY, f"asked for byte {len(image)}, got a block at {start}")
            )
        if more and not response.payload:
            raise FetchRefused(Refusal(Reason.INTEGRITY, f"an empty block at byte {start}"))
        if len(image) + len(response.payload) > limit:
            raise FetchRefused(Refusal(Reason.INTEGRITY, f"the image is over {limit} bytes"))
        image += response.payload
        if after_block is not None:
            await after_block(len(response.payload))
        if not more:
            return


async def fetch_manifest_key(context: aiocoap.Context, uri: str) -> VerifyingKey:
    """The public key SUIT manifests are signed with, from `uri` (MANIFEST_KEY_PATH).
    ConnectionLost or FetchRefused as for `download_image` (reason "rejected": without the
    key no manifest can be trusted)."""
    message = aiocoap.Message(code=aiocoap.GET, uri=uri)
    try:
        response = await _fetched(
            context.request(message), REQUEST_TIMEOUT_SECONDS, urlsplit(uri).path
        )
        key = serialization.load_pem_public_key(response.payload)
    except FetchRefused as refused:
        raise FetchRefused(
            Refusal(Reason.REJECTED, f"no manifest key: {refused.refusal.detail}")
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise FetchRefused(
            Refusal(Reason.REJECTED, "the manifest key is not a PEM public key")
        ) from None
    if not isinstance(key, VerifyingKey):
        raise FetchRefused(Refusal(Reason.REJECTED, "the manifest key is of an unknown kind"))
    return key


async def _fetched(request: Any, seconds: float, path: str) -> Any:
    """The successful response to a firmware fetch (see `download_image` for the errors)."""
    try:
        response = await asyncio.wait_for(request.response, seconds)
    except (aiocoap.error.Error, OSError, TimeoutError) as error:
        raise ConnectionLost(str(error) or type(error).__name__) from None
    if response.code.is_successful():
        return response
    detail = f"GET {path}: {response.code}"
    if response.code.class_ == _SERVER_ERROR_CLASS or response.code == Code.TOO_MANY_REQUESTS:
        raise ConnectionLost(detail)
    raise FetchRefused(Refusal(Reason.UNSUPPORTED, detail))


# --- the device on the wire -----------------------------------------------------------------


@dataclass
class FleetCounters:
    """What a fleet's devices have done so far; each device adds to it (one event loop, no
    locks). `connected` and `offline` are the devices in that condition now. `reports_ok` and
    `reports_failed` count reported-state and telemetry POSTs alike (`telemetry` the latter
    alone); `disconnects` are connections lost or refused unexpectedly (not offline periods);
    `refused` devices were turned away for good (revoked, decommissioned) and stopped.
    `firmware_downloads` are firmware images downloaded whole and checked, `firmware_bytes`
    the bytes of every block received; `updates_succeeded` and `updates_failed` count the
    firmware jobs that ended so (refused, failed download, installation or boot)."""

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
    firmware_downloads: int = 0
    firmware_bytes: int = 0
    updates_succeeded: int = 0
    updates_failed: int = 0

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
        self.firmware = Firmware(version=FIRMWARE[kind], storage_bytes=STORAGE_BYTES[kind])
        # Firmware failures have their own randomness, so that a run's faults and offline
        # periods stay the same whether or not a campaign updates the device meanwhile.
        self._firmware_rng = random.Random(f"{seed}/firmware")
        # The bytes of `firmware.job`'s image held so far (the device's update slot).
        self._image = bytearray()
        # Fetched once per connection, when a job first comes with a manifest.
        self._manifest_key: VerifyingKey | None = None
        self._vendor = vendor_id(CITYTWIN_VENDOR_DOMAIN)
        self._class = class_id(self._vendor, MODELS[kind])
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
        """Connect, follow the desired state and report until `stop` is set, going offline,
        rebooting into new firmware and reconnecting as the behaviour, firmware jobs and the
        network have it. Returns early only if the
        service refuses the device. Call `enroll` first."""
        if self._tls is None:
            raise SimulatorError(f"{self.device_id} has not enrolled")
        tls = self._tls
        stopping = asyncio.ensure_future(stop.wait())
        failures = 0
        try:
            while not stop.is_set():
                try:
                    away = await self._session(tls, stopping)
                except ConnectionLost as lost:
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
                if away is None:
                    return
                if isinstance(away, _Reboot):
                    await asyncio.wait({stopping}, timeout=self.behaviour.reboot_seconds)
                    self._boot(away)
                    continue
                self.counters.offline += 1
                self.counters.offline_periods += 1
                try:
                    await asyncio.wait({stopping}, timeout=away)
                finally:
                    self.counters.offline -= 1
        finally:
            stopping.cancel()

    async def _session(
        self, tls: ssl.SSLContext, stopping: asyncio.Future[Any]
    ) -> float | _Reboot | None:
        """One connection: observe the desired state, report, tick. Returns None once stopped,
        how long to stay offline, or the reboot into new firmware to go through;
        ConnectionLost or DeviceRefused otherwise."""
        context = await device_client_context(tls)
        self._manifest_key = None
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
            reboot = await self._on_desired(context, first)
            if reboot is not None:
                return reboot
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
                    reboot = await self._on_desired(context, notification)
                    if reboot is not None:
                        return reboot
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

    async def _on_desired(self, context: aiocoap.Context, notification: Any) -> _Reboot | None:
        """Apply a desired document (an observation's answer) and report what changed, then
        follow its firmware job; returns the reboot that installing firmware calls for."""
        try:
            desired = cbor2.loads(notification.payload) if notification.payload else {}
        except (cbor2.CBORDecodeError, ValueError):
            log.warning("%s: undecodable desired state ignored", self.device_id)
            return None
        if not isinstance(desired, dict):
            return None
        # Counted only when the desired state asked for something new; repeated notifications
        # of the same desired state (such as the first after a reconnection) are not changes.
        asked = bool(compute_delta(device_settings(desired), self.state.actual))
        self.state = follow_desired(self.state, desired, _now())
        if asked and await self._report(context):
            self.counters.desired_applied += 1
        return await self._follow_firmware(context, desired.get(FIRMWARE_MEMBER))

    async def _follow_firmware(self, context: aiocoap.Context, instruction: JSON) -> _Reboot | None:
        """Take the steps the desired firmware job calls for (firmware_updates.decide),
        reporting each; returns the reboot into an installed image."""
        decision = decide(self.firmware, instruction)
        if decision is None:
            return None
        if isinstance(decision, Withdrawn):
            self.firmware = forget_settled(self.firmware)
            return None
        if isinstance(decision, Refuse):
            await self._fail(
                context,
                failed(self.firmware, decision.instruction, decision.sha256, decision.refusal),
            )
            return None
        job = decision.job
        if isinstance(decision, AlreadyRunning):
            await self._step(context, already_running(self.firmware, job))
            return None
        manifest = await self._verified_manifest(context, job)
        if isinstance(manifest, Refusal):
            await self._fail(context, failed(self.firmware, job.instruction, job.sha256, manifest))
            return None
        if isinstance(decision, Download):
            if not await self._download(context, job, decision.offset):
                return None
        elif isinstance(decision, Keep):
            await self._step(context, downloaded(self.firmware, job))
        if job.action is Action.DOWNLOAD:
            return None
        sequence = self.firmware.manifest_sequence if manifest is None else manifest.sequence_number
        return await self._install(context, job, sequence)

    async def _verified_manifest(
        self, context: aiocoap.Context, job: Job
    ) -> ManifestContent | Refusal | None:
        """The job's SUIT manifest, verified with the service's manifest key and found to
        authorise the job; None if the job has none; the refusal if it fails."""
        if not job.manifest:
            return None
        if self._manifest_key is None:
            try:
                self._manifest_key = await fetch_manifest_key(
                    context, self.endpoint.uri(MANIFEST_KEY_PATH)
                )
            except FetchRefused as refused:
                return refused.refusal
        try:
            manifest = read_envelope(job.manifest, self._manifest_key)
        except ArtifactRejected as error:
            return Refusal(Reason.REJECTED, f"the manifest does not verify: {error}")
        problem = manifest_problem(self.firmware, job, manifest, self._vendor, self._class)
        return manifest if problem is None else problem

    async def _download(self, context: aiocoap.Context, job: Job, offset: int) -> bool:
        """Download the rest of `job`'s image (its first `offset` bytes are held), reporting
        progress every quarter, and check it. True once it is reported downloaded; False if
        the job failed (reported). ConnectionLost when the connection is lost, for real or
        as the behaviour plans it: the blocks in are kept for the next try to resume from."""
        del self._image[offset:]
        await self._step(context, downloading(self.firmware, job, offset))
        plan = plan_download(
            offset,
            job.size,
            self.behaviour.fw_connection_loss_rate,
            self.behaviour.fw_integrity_failure_rate,
            self._firmware_rng,
        )
        shown = progress(offset, job.size)

        async def after_block(length: int) -> None:
            nonlocal shown
            self.counters.firmware_bytes += length
            held = len(self._image)
            self.firmware = replace(self.firmware, received=held)
            if plan.lose_connection_at is not None and held >= plan.lose_connection_at:
                # Reported once the device is back: the service decides whether to retry.
                lost = Refusal(
                    Reason.CONNECTION_LOST, f"connection lost after {held} of {job.size} bytes"
                )
                self._apply(failed(self.firmware, job.instruction, job.sha256, lost))
                self.counters.updates_failed += 1
                raise ConnectionLost("simulated connection loss during a firmware download")
            if progress_due(shown, progress(held, job.size)):
                shown = progress(held, job.size)
                await self._step(context, downloading(self.firmware, job, held))

        try:
            await download_image(
                context,
                self.endpoint.uri(job.uri),
                self._image,
                limit=job.size,
                after_block=after_block,
            )
        except FetchRefused as refused:
            await self._fail(
                context, failed(self.firmware, job.instruction, job.sha256, refused.refusal)
            )
            return False
        if plan.corrupt_at is not None and plan.corrupt_at < len(self._image):
            self._image[plan.corrupt_at] ^= _CORRUPTION_MASK
        refusal = check_image(self.firmware, job, bytes(self._image))
        if refusal is not None:
            self._image.clear()
            update = failed(self.firmware, job.instruction, job.sha256, refusal, discard_image=True)
            await self._fail(context, update)
            return False
        self.counters.firmware_downloads += 1
        await self._step(context, downloaded(self.firmware, job))
        return True

    async def _install(
        self, context: aiocoap.Context, job: Job, manifest_sequence: int
    ) -> _Reboot | None:
        """Install the held image of `job`: report "updating", then either fail (an install
        error, as the behaviour plans it) or return the reboot into it."""
        await self._step(context, updating(self.firmware, job))
        outcome = plan_install(
            self.behaviour.fw_install_failure_rate,
            self.behaviour.fw_revert_rate,
            self._firmware_rng,
        )
        if outcome is InstallOutcome.INSTALL_ERROR:
            refusal = Refusal(Reason.INSTALL_ERROR, "writing the image to its slot failed")
            await self._fail(context, failed(self.firmware, job.instruction, job.sha256, refusal))
            return None
        identity = image_identity(job, bytes(self._image))
        return _Reboot(job, outcome, identity, manifest_sequence)

    def _boot(self, reboot: _Reboot) -> None:
        """Come back from a reboot on the new image, or on the old one if the bootloader fell
        back; reported once connected."""
        self._apply(
            booted(self.firmware, reboot.job, reboot.outcome, reboot.identity, reboot.sequence)
        )
        if reboot.outcome is InstallOutcome.SUCCESS:
            self._image.clear()
            self.counters.updates_succeeded += 1
        else:
            self.counters.updates_failed += 1

    def _apply(self, update: Update) -> None:
        self.firmware = update.firmware
        self.state = with_firmware(self.state, update.report)

    async def _step(self, context: aiocoap.Context, update: Update) -> bool:
        """Take `update` and report it; True if the service committed the report."""
        self._apply(update)
        return await self._report(context)

    async def _fail(self, context: aiocoap.Context, update: Update) -> None:
        """Take and report a failed job's `update`, and count it."""
        self.counters.updates_failed += 1
        await self._step(context, update)

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
        except ConnectionLost:
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
            raise ConnectionLost(str(error) or type(error).__name__) from None
        if response is None:
            raise ConnectionLost("the service ended the observation")
        if response.code.is_successful():
            return response
        detail = f"{response.code}: {response.payload.decode(errors='replace')}"
        if response.code in (Code.UNAUTHORIZED, Code.FORBIDDEN, Code.NOT_FOUND):
            raise DeviceRefused(detail)
        raise _Rejected(detail)


class _Rejected(Exception):
    """The service refused one request (e.g. 4.22 for a value outside the profile)."""


@dataclass(frozen=True)
class _Reboot:
    """A reboot into the installed image of `job`: it boots as `identity` under a manifest
    with `sequence`, unless `outcome` says the bootloader falls back."""

    job: Job
    outcome: InstallOutcome
    identity: ImageIdentity
    sequence: int


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
