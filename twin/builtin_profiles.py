"""The device profiles that ship with citytwin, one per supported device model.

Every built-in declares the `firmware` object of firmware_ota's device protocol: the job a
campaign writes into desired state and the progress the device reports; `firmware.version` is
what rollouts select on.
"""

from __future__ import annotations

from twin.profiles import Profile, PropertySpec, PropertyType

_B = PropertyType.BOOLEAN
_I = PropertyType.INTEGER
_N = PropertyType.NUMBER
_S = PropertyType.STRING
_O = PropertyType.OBJECT
_A = PropertyType.ARRAY

# The firmware object is where campaigns meet devices (firmware_ota's device protocol): the job
# members are desired (written by campaigns only, see twin_store), the progress members are
# reported. `version` is both: the target in desired, what runs in reported.
_FIRMWARE = (
    PropertySpec("firmware", _O, writable=True, description="Firmware job and installed firmware"),
    PropertySpec(
        "firmware.version", _S, writable=True, max_length=64, description="Firmware version"
    ),
    PropertySpec("firmware.sha256", _S, writable=True, max_length=64, description="Job: digest"),
    PropertySpec(
        "firmware.size", _I, writable=True, minimum=0, unit="B", description="Job: image size"
    ),
    PropertySpec("firmware.uri", _S, writable=True, max_length=256, description="Job: CoAP path"),
    PropertySpec(
        "firmware.signature",
        _S,
        writable=True,
        max_length=512,
        description="Job: detached signature, base64 (empty for MCUboot images)",
    ),
    PropertySpec(
        "firmware.manifest",
        _S,
        writable=True,
        max_length=8192,
        description="Job: signed SUIT envelope, base64",
    ),
    PropertySpec(
        "firmware.action",
        _S,
        writable=True,
        allowed_values=("download", "install"),
        description="Job: download only, or download and install",
    ),
    PropertySpec(
        "firmware.attempt", _I, writable=True, minimum=1, description="Job: attempt number"
    ),
    PropertySpec(
        "firmware.security_counter", _I, minimum=0, description="MCUboot security counter"
    ),
    PropertySpec("firmware.job", _S, max_length=64, description="Digest of the job reported on"),
    PropertySpec(
        "firmware.state",
        _S,
        allowed_values=("idle", "downloading", "downloaded", "updating"),
        description="Update state (LwM2M 5/3)",
    ),
    PropertySpec(
        "firmware.progress", _I, minimum=0, maximum=100, unit="%", description="Downloaded"
    ),
    PropertySpec(
        "firmware.result",
        _S,
        allowed_values=("none", "success", "failed"),
        description="Result of the last update (LwM2M 5/5)",
    ),
    PropertySpec(
        "firmware.reason",
        _S,
        allowed_values=(
            "integrity",
            "out_of_storage",
            "unsupported",
            "connection_lost",
            "install_error",
            "rejected",
        ),
        description="Why the last update failed",
    ),
    PropertySpec("firmware.detail", _S, max_length=256, description="Failure detail"),
)

# After IPSO 3311 (light control) and uCIFI 3416 (outdoor lamp controller).
LAMP_LED_DIMMABLE = Profile(
    model="lamp-led-dimmable",
    kind="lamp",
    description="Dimmable LED street lamp with a lamp controller",
    builtin=True,
    heartbeat_interval_seconds=300,
    properties=(
        PropertySpec("power", _B, writable=True, description="Lamp switched on"),
        PropertySpec(
            "brightness",
            _I,
            writable=True,
            minimum=0,
            maximum=100,
            unit="%",
            description="Dimming level while on",
        ),
        PropertySpec(
            "dimming_schedule",
            _A,
            writable=True,
            max_items=24,
            description="Dimming steps the controller applies on its own, in time order",
        ),
        PropertySpec(
            "dimming_schedule[]", _O, writable=True, description="One step of the schedule"
        ),
        PropertySpec(
            "dimming_schedule[].at",
            _S,
            writable=True,
            max_length=32,
            description='When the step starts: "HH:MM" local time, or "sunset", "sunrise",'
            ' "dusk" or "dawn" at the lamp\'s location, optionally with an offset such as'
            ' "sunset+00:30"',
        ),
        PropertySpec(
            "dimming_schedule[].offset_minutes",
            _I,
            writable=True,
            minimum=-720,
            maximum=720,
            unit="min",
            description="Offset from the sun event named in `at` (instead of an inline one)",
        ),
        PropertySpec(
            "dimming_schedule[].level",
            _I,
            writable=True,
            minimum=0,
            maximum=100,
            unit="%",
            description="Dimming level from that time on",
        ),
        PropertySpec("energy", _O, description="Energy metering"),
        PropertySpec(
            "energy.total_wh",
            _N,
            minimum=0,
            unit="Wh",
            description="Cumulative active energy",
        ),
        PropertySpec("energy.power_w", _N, minimum=0, unit="W", description="Active power now"),
        PropertySpec("fault_codes", _A, description="Vendor fault codes currently raised"),
        PropertySpec("fault_codes[]", _S, max_length=64, description="One vendor fault code"),
        PropertySpec("faults", _O, description="Fault flags"),
        # A failed lamp leaves a stretch of street dark: major, for the maintenance crew.
        PropertySpec(
            "faults.driver_failure",
            _B,
            alarm_severity="major",
            description="The LED driver has failed",
        ),
        PropertySpec(
            "faults.lamp_failure",
            _B,
            alarm_severity="major",
            description="The light source has failed",
        ),
        *_FIRMWARE,
    ),
)

_UG_M3 = "µg/m³"

ENV_SENSOR = Profile(
    model="env-sensor",
    kind="sensor",
    description="Environmental sensor: air quality, noise and parking-bay occupancy",
    builtin=True,
    # Battery sensors wake rarely: report, read their delta, sleep.
    heartbeat_interval_seconds=900,
    properties=(
        PropertySpec(
            "pm2_5", _N, minimum=0, maximum=1000, unit=_UG_M3, description="Fine particulates"
        ),
        PropertySpec(
            "pm10", _N, minimum=0, maximum=1000, unit=_UG_M3, description="Coarse particulates"
        ),
        PropertySpec(
            "no2", _N, minimum=0, maximum=2000, unit=_UG_M3, description="Nitrogen dioxide"
        ),
        PropertySpec(
            "noise_db", _N, minimum=0, maximum=200, unit="dB", description="Sound pressure level"
        ),
        PropertySpec("parking_occupied", _B, description="A vehicle occupies the parking bay"),
        PropertySpec("battery", _N, minimum=0, maximum=100, unit="%", description="Battery charge"),
        PropertySpec(
            "report_interval",
            _I,
            writable=True,
            minimum=10,
            maximum=86400,
            unit="s",
            description="Time between measurement reports",
        ),
        PropertySpec("faults", _O, description="Fault flags"),
        PropertySpec(
            "faults.calibration_error",
            _B,
            alarm_severity="minor",
            description="A sensor is out of calibration",
        ),
        *_FIRMWARE,
    ),
)

CAMERA_IP = Profile(
    model="camera-ip",
    kind="camera",
    description="IP video camera with local recording",
    builtin=True,
    heartbeat_interval_seconds=60,
    properties=(
        PropertySpec("recording", _B, writable=True, description="Recording to local storage"),
        PropertySpec(
            "stream_profile",
            _S,
            writable=True,
            allowed_values=("low", "medium", "high"),
            description="Bit-rate profile of the live stream",
        ),
        PropertySpec(
            "resolution",
            _S,
            writable=True,
            allowed_values=("720p", "1080p", "1440p", "2160p"),
            description="Video resolution",
        ),
        PropertySpec(
            "storage_health",
            _S,
            allowed_values=("ok", "degraded", "failed"),
            description="Health of the local storage",
        ),
        PropertySpec(
            "privacy_mask", _B, writable=True, description="Privacy masking of private areas"
        ),
        PropertySpec("faults", _O, description="Fault flags"),
        PropertySpec(
            "faults.storage_failure",
            _B,
            alarm_severity="major",
            description="Local storage has failed",
        ),
        *_FIRMWARE,
    ),
)

BUILTIN_PROFILES: tuple[Profile, ...] = (LAMP_LED_DIMMABLE, ENV_SENSOR, CAMERA_IP)

_BY_MODEL = {p.model: p for p in BUILTIN_PROFILES}


def builtin_profile(model: str) -> Profile | None:
    """The built-in profile of `model`, if there is one."""
    return _BY_MODEL.get(model)
