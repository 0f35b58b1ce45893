"""Real Flower deployments: one SuperLink, SuperNodes, TLS and SuperNode authentication.

The commands are Flower's own (``flower-superlink``, ``flower-supernode``, ``flwr``); this
module builds their command lines, makes the files they need (a test CA and a server
certificate, SuperNode key pairs, the ``config.toml`` connection entry) and starts and stops
the processes. docs/deployment.md shows the same commands to type on real machines;
tests/test_deployment.py runs them over loopback.

What Flower 1.41 does, checked in its sources (``flwr/superlink/cli/flower_superlink.py``,
``flwr/superlink/routers/fleet/node_auth.py``, ``flwr/supernode/fleet_http_connection.py``):

- The SuperLink serves the Fleet, Control and Runtime APIs over HTTP(S) on one ``--host`` /
  ``--port``; SuperNodes and ``flwr`` both connect to that address.
- TLS needs all three of ``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile``. The
  SuperLink's own ``flower-superexec`` connects back to it through ``--host:--port`` and checks
  the certificate against the CA, so the certificate must name that host (an IP SAN for
  ``127.0.0.1``).
- ``--enable-supernode-auth`` (TLS only) turns off self-registration: a SuperNode's public key
  must first be registered with ``flwr supernode register``; a SuperNode then signs every
  request with its private key (``--auth-supernode-private-key``, an OpenSSH EC key on a
  NIST curve). An unregistered SuperNode is refused ("Failed to activate SuperNode") and
  exits with status 1 ("Exit Code: 305").

Each process gets a log file and its own session; :meth:`ManagedProcess.stop` ends it and
the helpers it started (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``), also
those Flower detaches into sessions of their own or leaves orphaned for a few seconds. The
process tree is read from Linux's /proc; elsewhere only the started processes are stopped.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509  # a dependency of flwr
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..config import ConfigValue
from ..errors import FedmergeError
from .flower import flower_env, free_ports, write_run_config

log = logging.getLogger(__name__)


class DeploymentError(FedmergeError):
    """A SuperLink or SuperNode did not start, or a ``flwr`` command failed."""


def flower_bin(name: str) -> str:
    """Path of a Flower command installed beside this interpreter (else the bare name)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# -- certificates and keys ------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS setup: the CA that clients trust, the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)  # private keys: owner only


def make_tls_files(
    dest: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), *, days: int = 30
) -> TlsFiles:
    """Make a private CA and a SuperLink certificate signed by it (EC P-256, PEM).

    Parameters
    ----------
    dest : Path
        Folder for ``ca.crt``, ``server.pem`` and ``server.key`` (created if missing).
    hosts : sequence of str
        Names and IP addresses the SuperLink is reached by; each becomes a subject
        alternative name (clients check the address they dial against these).
    days : int
        Validity of both certificates, from now.

    Returns
    -------
    TlsFiles
        The three paths, for ``flower-superlink --ssl-*`` and ``--root-certificates``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmerge test CA"))
        .issuer_name(_name("fedmerge test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(dest / "ca.crt", dest / "server.pem", dest / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_supernode_keys(dest: Path, name: str) -> tuple[Path, Path]:
    """Make a SuperNode's key pair: EC P-384 in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``.

    Returns ``(private, public)``: ``dest/name`` for ``flower-supernode
    --auth-supernode-private-key`` and ``dest/name.pub`` for ``flwr supernode register``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = dest / name, dest / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return private, public


# -- command lines ----------------------------------------------------------------------------
def superlink_command(
    port: int, *, host: str = "127.0.0.1", tls: TlsFiles | None = None, supernode_auth: bool = False
) -> list[str]:
    """``flower-superlink`` for a deployment (not simulation); insecure when ``tls`` is None.

    Runtime dependency installation is off: the SuperLink machine has fedmerge installed, and
    installing the app's dependencies per run needs the internet.
    """
    cmd = [flower_bin("flower-superlink")]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert)]
        cmd += ["--ssl-keyfile", str(tls.server_key)]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    return cmd


def supernode_command(
    superlink: str,
    port: int,
    partition_id: int,
    num_partitions: int,
    *,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    insecure: bool = False,
) -> list[str]:
    """``flower-supernode`` serving one client: partition ``partition_id`` of ``num_partitions``.

    ``superlink`` is the SuperLink's ``host:port``; ``port`` the SuperNode's own Runtime API
    port (one per SuperNode on a machine). With TLS (``insecure=False``) the SuperLink's
    certificate is checked against ``root_certificates``, or the system's CAs when None.
    """
    cmd = [flower_bin("flower-supernode")]
    if insecure:
        cmd.append("--insecure")
    if root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    cmd += ["--superlink", superlink, "--port", str(port)]
    cmd += ["--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
    return cmd


def connection_toml(name: str, address: str, *, root_certificates: Path | None = None) -> str:
    """The ``$FLWR_HOME/config.toml`` entry that tells ``flwr`` where the SuperLink is."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines.append(f'address = "{address}"')
    if root_certificates is None:
        lines.append("insecure = true")
    else:  # Flower requires an absolute path here
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    return "\n".join(lines) + "\n"


# -- processes ------------------------------------------------------------------------------
def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat), None if it is gone."""
    stat = _stat(pid)
    return int(stat[19]) if stat else None


def _cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(pid: int, *, include_self: bool = False) -> list[tuple[int, int]]:
    """``(pid, start time)`` of the live processes started on behalf of ``pid`` (Linux /proc).

    Its descendants, the other members of its session (we start each process in a session of
    its own; a child orphaned by its parent's exit stays in it), and Flower helpers that name
    it with ``--parent-pid`` (``flower-superexec`` and the app processes start sessions of
    their own and outlive their parent for seconds), each with their descendants. The start
    time tells a process from a later one that reuses its pid.
    """
    children: dict[int, list[int]] = {}
    todo = []
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(entry.name)
        if stat is None or stat[0] == "Z" or int(entry.name) == pid:
            continue
        child = int(entry.name)
        children.setdefault(int(stat[1]), []).append(child)
        if int(stat[3]) == pid or f"--parent-pid {pid} " in _cmdline(child) + " ":
            todo.append(child)
    todo += children.get(pid, [])
    found: dict[int, int] = {}
    if include_self and (start := _start_time(pid)) is not None:
        found[pid] = start
    while todo:
        child = todo.pop()
        if child not in found and (start := _start_time(child)) is not None:
            found[child] = start
            todo += children.get(child, [])
    return list(found.items())


def _signal(procs: Sequence[tuple[int, int]], sig: int) -> None:
    for pid, start in procs:
        if _start_time(pid) == start:  # the same process, not a reused pid
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_gone(procs: Sequence[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _start_time(p[0]) == p[1] and not _zombie(p[0])]
        time.sleep(0.1)
    return alive


def _zombie(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"


@dataclass
class ManagedProcess:
    """A Flower process this module started, with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything it printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        """Wait until it exits; returns its exit status (raises ``TimeoutExpired``)."""
        return self.popen.wait(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM it, then SIGKILL after ``grace`` seconds; the same for its helpers."""
        stop_processes([self], grace)


def stop_processes(procs: Sequence[ManagedProcess], grace: float = 5.0) -> None:
    """Stop ``procs`` together (SIGTERM, then SIGKILL after ``grace`` s), and their helpers.

    All are signalled at once, so stopping a federation costs one grace period, not one per
    process; the first in ``procs`` are signalled first (SuperNodes before their SuperLink).
    """
    helpers = {h for p in procs for h in descendants(p.pid)}
    for proc in procs:
        if proc.alive():
            proc.popen.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()
    # Flower's helpers watch their parent and exit when it is gone, but only after a retry
    # loop (seconds); terminate those still around, then kill the stubborn ones.
    helpers |= {h for p in procs for h in descendants(p.pid)}
    left = _wait_gone(list(helpers), 0.5)
    _signal(left, signal.SIGTERM)
    _signal(_wait_gone(left, grace), signal.SIGKILL)
    _wait_gone(left, grace)


def start_process(
    name: str, cmd: Sequence[str], *, log_dir: Path, env: Mapping[str, str], cwd: Path
) -> ManagedProcess:
    """Start ``cmd`` in a session of its own, its output going to ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log.info("starting %s: %s", name, " ".join(cmd))
    with log_path.open("wb") as out:  # the child keeps its own handle
        popen = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, popen, log_path)


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    *,
    timeout: float = 60.0,
    process: ManagedProcess | None = None,
) -> None:
    """Block until something listens on ``host:port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise DeploymentError(
                f"{process.name} exited with status {process.popen.returncode} before "
                f"listening on {host}:{port}; its output:\n{process.output()[-3000:]}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


# -- a federation on this machine -----------------------------------------------------------
class LocalFederation:
    """A SuperLink and SuperNodes on this machine (loopback): the deployment runtime, not
    simulation. Use as a context manager: every process it started is stopped on exit, also
    when the body raises.

    Parameters
    ----------
    work_dir : Path
        Scratch folder: logs, certificates, keys, and a ``FLWR_HOME`` for the SuperLink and
        ``flwr`` plus one per SuperNode (as on separate machines).
    tls : bool
        Make a CA and a certificate for 127.0.0.1 and connect everything over TLS.
    supernode_auth : bool
        Start the SuperLink with ``--enable-supernode-auth`` (needs ``tls``); SuperNodes then
        connect only after :meth:`register_supernode`.
    name : str
        Name of the connection entry written to ``config.toml``.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        tls: bool = False,
        supernode_auth: bool = False,
        name: str = "local-deploy",
        startup_timeout: float = 90.0,
    ) -> None:
        if supernode_auth and not tls:
            raise DeploymentError("SuperNode authentication needs TLS (Flower refuses it)")
        self.work_dir, self.name, self.startup_timeout = work_dir, name, startup_timeout
        self.supernode_auth = supernode_auth
        self.flwr_home = work_dir / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.flwr_home)
        self.tls = make_tls_files(work_dir / "certificates") if tls else None
        self.processes: list[ManagedProcess] = []
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, name: str, cmd: list[str], env: Mapping[str, str]) -> ManagedProcess:
        proc = start_process(name, cmd, log_dir=self.work_dir / "logs", env=env, cwd=self.work_dir)
        self.processes.append(proc)
        return proc

    def start_superlink(self) -> ManagedProcess:
        """Start the SuperLink, wait until it listens, write the ``flwr`` connection entry."""
        cmd = superlink_command(self.port, tls=self.tls, supernode_auth=self.supernode_auth)
        proc = self._start("superlink", cmd, self.env)
        wait_for_port(self.port, timeout=self.startup_timeout, process=proc)
        root = self.tls.ca_cert if self.tls else None
        toml = connection_toml(self.name, self.address, root_certificates=root)
        (self.flwr_home / "config.toml").write_text(toml)
        return proc

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` against this federation's ``FLWR_HOME``."""
        return subprocess.run(
            [flower_bin("flwr"), *args],
            env=self.env,
            cwd=self.work_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register_supernode(self, public_key: Path) -> int:
        """``flwr supernode register``: authorise a SuperNode's key; returns its node id."""
        out = self.flwr("supernode", "register", str(public_key), self.name, "--format", "json")
        try:
            reply = json.loads(out.stdout[out.stdout.index("{") :])
            return int(reply["node-id"])
        except (ValueError, KeyError) as exc:
            raise DeploymentError(
                f"flwr supernode register failed (exit {out.returncode}): "
                f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
            ) from exc

    def list_supernodes(self) -> list[dict]:
        """``flwr supernode list --format json``: the SuperNodes the SuperLink knows."""
        out = self.flwr("supernode", "list", self.name, "--format", "json")
        try:
            return list(json.loads(out.stdout[out.stdout.index("{") :])["nodes"])
        except (ValueError, KeyError) as exc:
            raise DeploymentError(f"flwr supernode list failed: {out.stdout}{out.stderr}") from exc

    def start_supernode(
        self,
        partition_id: int,
        num_partitions: int,
        *,
        auth_key: Path | None = None,
        name: str | None = None,
        trust_ca: bool = True,
    ) -> ManagedProcess:
        """Start a SuperNode for one partition, with its own ``FLWR_HOME`` and port.

        ``auth_key``: its private key (``--auth-supernode-private-key``). ``trust_ca=False``
        (with TLS): connect over TLS without being given the federation's CA, to show that the
        SuperLink's certificate is really checked.
        """
        name = name or f"supernode-{partition_id}"
        home = self.work_dir / name / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        cmd = supernode_command(
            self.address,
            free_ports(1)[0],
            partition_id,
            num_partitions,
            root_certificates=self.tls.ca_cert if self.tls and trust_ca else None,
            auth_key=auth_key,
            insecure=self.tls is None,
        )
        return self._start(name, cmd, {**self.env, "FLWR_HOME": str(home)})

    def run(
        self, app_dir: Path, run_config: Mapping[str, ConfigValue], *, timeout: float = 600.0
    ) -> subprocess.CompletedProcess:
        """``flwr run APP_DIR <connection> --run-config FILE --stream``; waits for the end.

        ``app_dir``: the project folder (``pyproject.toml`` with ``[tool.flwr.app]``); a
        relative path is taken from the current directory.
        """
        config_file = write_run_config(run_config, self.work_dir / "run-config.toml")
        args = [
            "run",
            str(Path(app_dir).resolve()),
            self.name,
            "--run-config",
            str(config_file),
            "--stream",
        ]
        return self.flwr(*args, timeout=timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the SuperNodes and the SuperLink, with the helpers they started."""
        stop_processes(list(reversed(self.processes)), grace)
