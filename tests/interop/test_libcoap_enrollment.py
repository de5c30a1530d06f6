"""EST-coaps enrollment (RFC 9148) as a C device stack does it: key and CSR from the `openssl`
CLI, transfers with libcoap's `coap-client-openssl` over `coaps+tcp`, the issued certificate
checked with `openssl verify`, then used by libcoap as its TLS client certificate.

Our own tests use aiocoap and `cryptography` on both ends, so they cannot catch an encoding
that only Python agrees with itself on (challengePassword string types, content-format
numbers, CSM/ALPN details, PKCS#8 vs SEC1 keys). These tests do.

Both tools come from the OS (Debian/Ubuntu: `apt-get install libcoap3-bin openssl`, which
`make interop-tools` does where it can). Without them the tests skip, except under CI=true,
where a missing tool is a failure: CI must exercise them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from tests.conftest import Api, Deployment, Server, unique

COAP_CLIENT = "coap-client-openssl"
OPENSSL = "openssl"

PKCS10 = 286
PKIX_CERT = 287
JSON = 50

# libcoap gives up on a silent peer after this many seconds (its default is 90). A stalled TLS
# handshake costs this plus libcoap's fixed 5 s, so the subprocess gets a margin above both.
_CLIENT_WAIT_SECONDS = 5
_SUBPROCESS_MARGIN_SECONDS = 15

# coap-client-openssl 4.3.1 exits 0 whatever happens (4.xx, TLS failure, refused, timeout), so
# the outcome is read from the PDU dump `-v 6` prints on stdout. Response lines carry a code
# ("v:1 t:CON c:2.04 i:0000 {01} [ ... ]"); request lines carry a method (c:POST) and CSM
# lines "c:CSM", and the request line is printed even if it was never sent, so only codes count.
_RESPONSE_LINE = re.compile(r"^v:1 t:\w+ c:([2-5]\.\d\d) .*$", re.MULTILINE)
_CONTENT_FORMAT = re.compile(r"Content-Format:([^,\]]+)")

# Subject and challengePassword must come from the config file: `openssl req -subj` silently
# drops the [req_attributes] section (OpenSSL 3.0), leaving a CSR without the code.
# string_mask = default encodes the password as a PrintableString, as many device stacks do
# (OpenSSL's own default would be UTF8String, which our aiocoap tests already cover).
_CSR_CONFIG = """\
[req]
prompt             = no
distinguished_name = dn
attributes         = req_attributes
string_mask        = default
[dn]
CN           = $ENV::CSR_CN
serialNumber = $ENV::CSR_SN
[req_attributes]
challengePassword = $ENV::CSR_OTP
"""


@dataclass(frozen=True)
class CoapResult:
    """What one coap-client run gave: the final response code (None when no response came:
    TLS or connect failure, timeout), its body and content format, and the raw output."""

    code: str | None
    payload: bytes
    content_format: str | None  # libcoap prints some formats by name ("application/json")
    stdout: str  # libcoap's log: every level goes to stdout
    stderr: str  # error responses as "4.03 <diagnostic>"
    elapsed: float
    args: tuple[str, ...]

    def describe(self) -> str:
        """The whole run, for assertion messages."""
        return (
            f"$ {' '.join(self.args)}\ncode={self.code} cf={self.content_format} "
            f"len={len(self.payload)} t={self.elapsed:.3f}s\n"
            f"--- stdout:\n{self.stdout}--- stderr:\n{self.stderr}"
        )


def coap_client(
    uri: str,
    *,
    method: str = "get",
    payload_file: Path | None = None,
    content_format: int | None = None,
    accept: int | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> CoapResult:
    """Run one `coap-client-openssl` request and classify its outcome reliably."""
    if payload_file is not None and not payload_file.exists():
        # coap-client would print an fopen error and still send the request, with no payload.
        raise FileNotFoundError(payload_file)
    # A fresh directory per call: coap-client neither creates nor truncates the -o file on an
    # error or an empty body, so a stale file would pass for this call's answer.
    with tempfile.TemporaryDirectory() as scratch:
        body = Path(scratch) / "body"
        args = [COAP_CLIENT, "-v", "6", "-B", str(_CLIENT_WAIT_SECONDS), "-m", method]
        args += ["-o", str(body)]
        if payload_file is not None:
            args += ["-f", str(payload_file)]
        # Numbers only: libcoap silently omits an option whose format name it does not know.
        if content_format is not None:
            args += ["-t", str(content_format)]
        if accept is not None:
            args += ["-A", str(accept)]
        # -C also turns on server certificate verification; without it libcoap trusts anyone.
        if ca is not None:
            args += ["-C", str(ca)]
        if cert is not None:
            args += ["-c", str(cert)]
        if key is not None:
            args += ["-j", str(key)]
        args.append(uri)
        started = time.monotonic()
        run = subprocess.run(
            args,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=_CLIENT_WAIT_SECONDS + _SUBPROCESS_MARGIN_SECONDS,
            check=False,
        )
        elapsed = time.monotonic() - started
        stdout = run.stdout.decode("utf-8", "replace")
        # The last response counts: block-wise uploads answer 2.31 Continue before the result.
        responses = list(_RESPONSE_LINE.finditer(stdout))
        code = responses[-1].group(1) if responses else None
        answered_format = None
        if responses:
            found = _CONTENT_FORMAT.search(responses[-1].group(0))
            answered_format = found.group(1).strip() if found else None
        payload = body.read_bytes() if body.exists() else b""
    return CoapResult(
        code=code,
        payload=payload,
        content_format=answered_format,
        stdout=stdout,
        stderr=run.stderr.decode("utf-8", "replace"),
        elapsed=elapsed,
        args=tuple(args),
    )


def openssl(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run `openssl ARGS` in `cwd`; its stdout, or a test failure with its stderr."""
    run = subprocess.run(
        [OPENSSL, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, f"openssl {' '.join(args)} failed:\n{run.stdout}{run.stderr}"
    return run.stdout


@pytest.fixture
def tools() -> None:
    """Skip without the tools, or fail when CI=true (CI must run these tests)."""
    missing = [tool for tool in (COAP_CLIENT, OPENSSL) if shutil.which(tool) is None]
    if not missing:
        return
    message = (
        f"{' and '.join(missing)} not found on PATH (Debian/Ubuntu: "
        "`apt-get install libcoap3-bin openssl`, or `make interop-tools`)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true requires them", pytrace=False)
    pytest.skip(message)


@dataclass
class Fleet:
    """A running server, the fleet CA chain as files, and an admin API."""

    server: Server
    api: Api
    workdir: Path
    chain: Path  # issuing CA, then root: what a device is given to trust the server
    root: Path
    issuing: Path

    @property
    def coaps(self) -> str:
        return f"coaps+tcp://127.0.0.1:{self.server.coaps_port}"

    def register(self, serial: str) -> tuple[str, str]:
        """Register a lamp with an enrollment; (device id, enrollment code)."""
        response = self.api.call(
            self.api.provisioning.CreateEnrollment,
            p.CreateEnrollmentRequest(
                device=d.Device(
                    kind=d.LAMP,
                    model="lamp-led-dimmable",
                    serial_number=serial,
                    labels={"district": "interop"},
                )
            ),
        )
        return response.device.name.removeprefix("devices/"), response.enrollment_code

    def certificates(self, device_id: str) -> list[p.Certificate]:
        return list(
            self.api.call(
                self.api.provisioning.ListCertificates,
                p.ListCertificatesRequest(device=f"devices/{device_id}"),
            ).certificates
        )

    def make_csr(self, serial: str, code: str) -> tuple[Path, Path]:
        """A P-256 key (PKCS#8 PEM) and a DER CSR for it, made by the openssl CLI; (key, csr)."""
        config = self.workdir / "csr.cnf"
        config.write_text(_CSR_CONFIG)
        key = self.workdir / f"{serial}.key.pem"
        csr = self.workdir / f"{serial}.csr.der"
        openssl(
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            str(key),
            cwd=self.workdir,
        )
        env = {"CSR_CN": "lamp", "CSR_SN": serial, "CSR_OTP": code}
        openssl(
            "req",
            "-new",
            "-config",
            str(config),
            "-key",
            str(key),
            "-outform",
            "DER",
            "-out",
            str(csr),
            cwd=self.workdir,
            env=env,
        )
        # Guard the recipe itself: a CSR without the code would make the 4.03 test meaningless.
        text = openssl(
            "req", "-inform", "DER", "-in", str(csr), "-noout", "-text", cwd=self.workdir
        )
        assert f"challengePassword        :{code}" in text, text
        return key, csr

    def enroll(self, csr: Path) -> CoapResult:
        """POST the CSR to `sen`, trusting the fleet chain, asking for a DER certificate."""
        return coap_client(
            self.coaps + "/.well-known/est/sen",
            method="post",
            payload_file=csr,
            content_format=PKCS10,
            accept=PKIX_CERT,
            ca=self.chain,
        )


@pytest.fixture
def fleet(tools: None, deployment: Deployment, tmp_path: Path) -> Fleet:
    """The shared server (each test enrolls a device of its own) and a device working
    directory holding its trust files."""
    workdir = tmp_path / "device"
    workdir.mkdir()
    chain, root_file, issuing_file = (workdir / f"{n}.pem" for n in ("chain", "root", "issuing"))
    # The fleet CA, created by the server's first start.
    chain_pem = deployment.trust.decode()
    issuing, root = x509.load_pem_x509_certificates(chain_pem.encode())
    assert issuing.issuer == root.subject and root.issuer == root.subject
    chain.write_text(chain_pem)
    issuing_file.write_bytes(issuing.public_bytes(serialization.Encoding.PEM))
    root_file.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return Fleet(
        deployment.server, deployment.api("admin"), workdir, chain, root_file, issuing_file
    )


def _enrolled(fleet: Fleet, result: CoapResult) -> Path:
    """Check a 2.04 DER-certificate answer and store it as PEM (converted by openssl)."""
    assert result.code == "2.04", f"{result.describe()}\n--- server log:\n{fleet.server.log_text()}"
    assert result.content_format == str(PKIX_CERT), result.describe()
    der = fleet.workdir / "cert.der"
    der.write_bytes(result.payload)
    pem = fleet.workdir / "cert.pem"
    openssl("x509", "-inform", "DER", "-in", str(der), "-out", str(pem), cwd=fleet.workdir)
    return pem


def test_libcoap_device_enrolls_and_reads_its_twin(fleet: Fleet) -> None:
    serial = unique("SN")
    device_id, code = fleet.register(serial)
    key, csr = fleet.make_csr(serial, code)

    cert = _enrolled(fleet, fleet.enroll(csr))

    # The chain as a device's verifier sees it: only the root as anchor, the issuing CA as an
    # untrusted intermediate, and the certificate fit for a TLS client.
    verdict = openssl(
        "verify",
        "-CAfile",
        str(fleet.root),
        "-untrusted",
        str(fleet.issuing),
        "-purpose",
        "sslclient",
        str(cert),
        cwd=fleet.workdir,
    )
    assert verdict.strip() == f"{cert}: OK"
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    assert issued.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == serial
    assert [c.state for c in fleet.certificates(device_id)] == [p.VALID]

    # The same key and certificate (openssl's PKCS#8 PEM key) as libcoap's TLS client identity.
    twin = coap_client(fleet.coaps + "/twin", ca=fleet.chain, cert=cert, key=key)
    assert twin.code == "2.05", f"{twin.describe()}\n--- server log:\n{fleet.server.log_text()}"
    # libcoap names the formats it knows and prints others as numbers.
    assert twin.content_format in ("application/json", str(JSON)), twin.describe()
    body = json.loads(twin.payload)
    assert body["device"] == device_id, body


def test_libcoap_reused_enrollment_code_is_refused(fleet: Fleet) -> None:
    serial = unique("SN")
    device_id, code = fleet.register(serial)
    _, csr = fleet.make_csr(serial, code)
    _enrolled(fleet, fleet.enroll(csr))

    # The very same request again, as a device retrying after a lost answer would send it.
    again = fleet.enroll(csr)
    assert again.code == "4.03", again.describe()
    assert "used" in again.stderr, again.describe()  # coap-client prints the diagnostic there
    assert again.payload == b""
    assert len(fleet.certificates(device_id)) == 1
