"""fedmerge on a real Flower deployment over loopback: SuperLink, SuperNodes, TLS, authentication.

The slow tests start one ``flower-superlink`` (the deployment runtime, not simulation) and
SuperNodes as separate processes, run ``flwr run <app copy> <connection>`` against them, and
stop everything they started (``LocalFederation`` is a context manager; the fixture stops it
again on failure and checks that no process is left). Each message starts a fresh ClientApp
process on a SuperNode, so a round costs seconds even for the tiny model used here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from fedmerge.config import RunConfig
from fedmerge.engine.deploy import (
    DeploymentError,
    LocalFederation,
    ManagedProcess,
    TlsFiles,
    descendants,
    make_supernode_keys,
    make_tls_files,
    start_process,
    superlink_command,
    supernode_command,
)
from fedmerge.engine.flower import flower_env, free_ports
from fedmerge.results import (
    CONFIG_JSON,
    METRICS_CSV,
    METRICS_JSON,
    MODEL_FILE,
    PLOT_FILE,
    SCOPE_PLOT_FILE,
    read_metrics,
)
from fedmerge.runner import run

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "deployment.md"
RESULT_FILES = (CONFIG_JSON, METRICS_JSON, METRICS_CSV, MODEL_FILE, PLOT_FILE, SCOPE_PLOT_FILE)
#: The run every deployment test submits: embedded digits, 2 clients, 2 rounds, a tiny MLP.
RUN = {
    "dataset": "digits",
    "num-clients": 2,
    "num-rounds": 2,
    "model": "mlp",
    "mlp-hidden": "16",
    "seed": 0,
}
#: Flower 1.41's SuperNode log line for each instruction it takes (one per round here).
RECEIVED_TRAIN = "Receiving: train message"


def copy_app(dest: Path) -> Path:
    """What a Flower app bundle holds: the project's sources and pyproject, no install."""
    for name in ("fedmerge", "strategies", "clients"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def leftovers(fed: LocalFederation, started: set[tuple[int, int]]) -> list[str]:
    """Live processes of this federation: any of ``started`` (pid, start time) still running,
    and any Flower process whose command line names one of its ports (``pgrep -f``-style)."""
    ports = {fed.port} | {
        int(p.popen.args[p.popen.args.index("--port") + 1]) for p in fed.processes
    }
    names = {f":{port}" for port in ports} | {f"--port {port}" for port in ports}
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode() + " "
        except OSError:
            continue
        if stat[0] == "Z":  # a zombie has ended; only its parent has not collected it yet
            continue
        flower = "flower-" in cmdline or "flwr-" in cmdline
        named = any(f"{name} " in cmdline for name in names)
        if (int(entry.name), int(stat[19])) in started or (flower and named):
            found.append(f"{entry.name}: {cmdline}")
    return found


def everything_started(fed: LocalFederation) -> set[tuple[int, int]]:
    """(pid, start time) of every process the federation runs now, helpers included."""
    return {proc for p in fed.processes for proc in descendants(p.pid, include_self=True)}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Callable[..., LocalFederation]]:
    """Make a LocalFederation; whatever happens in the test, stop it and check nothing is left."""
    made: list[LocalFederation] = []

    def make(**options: bool) -> LocalFederation:
        fed = LocalFederation(tmp_path / f"deploy-{len(made)}", **options)
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in made:
            fed.stop()
        for fed in made:
            assert not leftovers(fed, set()), leftovers(fed, set())


def stop_and_check(fed: LocalFederation) -> None:
    """Stop the federation inside the test, then assert that none of its processes is left."""
    started = everything_started(fed)
    assert len(started) > len(fed.processes)  # the helpers (flower-superexec) are included
    fed.stop()
    left = leftovers(fed, started)
    assert not left, left
    assert all(not p.alive() for p in fed.processes)
    # and literally: pgrep finds no SuperLink on this federation's port (exit status 1)
    pattern = f"flower-superlink .*--port {fed.port}( |$)"
    assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1


def submit(fed: LocalFederation, app_dir: Path, out: Path, **overrides: object) -> Path:
    """``flwr run`` the small run; returns its results folder."""
    cfg = {**RUN, **overrides, "output-dir": str(out), "run-name": "deploy"}
    proc = fed.run(app_dir, cfg, timeout=480)  # type: ignore[arg-type]
    superlink_log = fed.processes[0].output()[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + superlink_log
    rounds = cfg["num-rounds"]
    assert f"fedmerge | round {rounds}/{rounds}" in proc.stdout  # the ServerApp's lines
    return out / "deploy"


def check_results(run_dir: Path, overrides: dict[str, object]) -> list[dict]:
    """The ServerApp's results folder is complete, and the model learned something."""
    for name in RESULT_FILES:
        assert (run_dir / name).is_file(), f"{name} missing in {sorted(run_dir.iterdir())}"
    config = json.loads((run_dir / CONFIG_JSON).read_text())
    for key, value in {**RUN, **overrides}.items():
        assert config["config"][key] == value, key
    assert config["facts"]["flwr"].startswith("1.")
    rows = read_metrics(run_dir)
    rounds = int({**RUN, **overrides}["num-rounds"])  # type: ignore[call-overload]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    csv_lines = (run_dir / METRICS_CSV).read_text().splitlines()
    assert "test-accuracy" in csv_lines[0].split(",") and len(csv_lines) == rounds + 2
    assert rows[0]["test-accuracy"] < 0.3  # 10 classes, an untrained model
    assert rows[-1]["test-accuracy"] > 0.6 > rows[0]["test-accuracy"]
    state = torch.load(run_dir / MODEL_FILE, weights_only=True)
    assert state and all(torch.isfinite(t).all() for t in state.values())
    return rows


def assert_same_as_local_engine(rows: list[dict], tmp_path: Path, **overrides: object) -> None:
    """The deployment computed what fedmerge's in-process engine computes for the same config."""
    cfg = {**RUN, **overrides, "output-dir": str(tmp_path / "local"), "run-name": "local"}
    local = read_metrics(run(RunConfig.from_mapping(cfg), "local"))
    for a, b in zip(local, rows, strict=True):
        # aggregation order follows reply arrival: float sums may differ in the last bits
        assert a["test-accuracy"] == pytest.approx(b["test-accuracy"], abs=2e-3)
        assert a["test-loss"] == pytest.approx(b["test-loss"], rel=1e-3)


# -- fast: files and command lines -----------------------------------------------------------
def test_tls_files_form_a_chain_that_names_the_superlink(tmp_path):
    tls = make_tls_files(tmp_path / "certs", ("127.0.0.1", "localhost", "superlink.example"))
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature does not check
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example"]
    key = load_pem_private_key(tls.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    assert tls.server_key.stat().st_mode & 0o077 == 0  # private key readable by owner only
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.server_cert, tls.server_key)  # what the SuperLink's server loads
    ssl.create_default_context(cafile=tls.ca_cert)  # what SuperNodes and flwr load


def test_supernode_keys_are_what_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key  # Flower's own checks
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    private, public = make_supernode_keys(tmp_path / "keys", "node0")
    other_private, _ = make_supernode_keys(tmp_path / "keys", "node1")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp384r1" and private.stat().st_mode & 0o077 == 0
    assert try_load_public_key(public) == public_key_to_bytes(key.public_key())
    other = load_ssh_private_key(other_private.read_bytes(), None)
    assert public_key_to_bytes(other.public_key()) != public_key_to_bytes(key.public_key())


def test_connection_entry_is_what_flwr_reads(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection

    from fedmerge.engine.deploy import connection_toml

    plain = tomllib.loads(connection_toml("local-deploy", "127.0.0.1:8000"))
    assert plain["superlink"]["default"] == "local-deploy"
    conn = parse_superlink_connection(plain["superlink"]["local-deploy"], "local-deploy")
    assert (conn.address, conn.insecure, conn.root_certificates) == ("127.0.0.1:8000", True, None)
    ca = tmp_path / "ca.crt"
    tls = tomllib.loads(connection_toml("prod", "10.0.0.5:8000", root_certificates=ca))
    conn = parse_superlink_connection(tls["superlink"]["prod"], "prod")
    assert (conn.insecure, conn.root_certificates) == (False, str(ca.resolve()))


def test_supernode_auth_without_tls_is_refused_before_starting(tmp_path):
    with pytest.raises(DeploymentError, match="needs TLS"):
        LocalFederation(tmp_path, supernode_auth=True)


def _alive(pid: int, start: str) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    fields = stat.exists() and stat.read_text().rsplit(")", 1)[1].split()
    return bool(fields) and fields[0] != "Z" and fields[19] == start


def _spawn(tmp_path: Path, name: str, helper: str, *, detach: bool, then: str) -> ManagedProcess:
    """A process that starts ``helper`` (in a session of its own if ``detach``), prints its
    pid, then runs ``then``."""
    code = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {helper!r}], start_new_session={detach})\n"
        "print(p.pid, flush=True)\n"
        f"{then}\n"
    )
    proc = start_process(name, [sys.executable, "-c", code], log_dir=tmp_path, env={}, cwd=tmp_path)
    for _ in range(200):
        if proc.output().strip():
            break
        time.sleep(0.05)
    return proc


def test_stop_ends_the_process_and_the_helpers_it_left_behind(tmp_path):
    # Like flower-superlink and its flower-superexec: the helper runs in a session of its own
    # and ignores SIGTERM. Like a SuperNode refused at connection: it exits at once and leaves
    # its flower-superexec behind, orphaned. stop() must end all of them.
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    parent = _spawn(tmp_path, "parent", stubborn, detach=True, then="time.sleep(600)")
    quitter = _spawn(tmp_path, "quitter", "import time; time.sleep(600)", detach=False, then="")
    try:
        helpers = [int(p.output().split()[0]) for p in (parent, quitter)]
        assert quitter.wait(30) == 0  # gone, its helper orphaned
        assert [pid for pid, _ in descendants(parent.pid)] == [helpers[0]]
        assert [pid for pid, _ in descendants(quitter.pid)] == [helpers[1]]
        starts = [
            Path(f"/proc/{h}/stat").read_text().rsplit(")", 1)[1].split()[19] for h in helpers
        ]
        for proc in (parent, quitter):
            proc.stop(grace=1.0)
        assert not parent.alive()
        assert not any(_alive(h, s) for h, s in zip(helpers, starts, strict=True))
    finally:
        for proc in (parent, quitter):
            if proc.alive():
                proc.popen.kill()


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\\\n", " "))


def test_docs_show_the_commands_the_tests_run():
    # docs/deployment.md must show exactly what LocalFederation starts (flags and order),
    # rendered with the docs' example ports and file names.
    docs = _one_line(DOCS.read_text())
    certs = Path("certificates")
    tls = TlsFiles(certs / "ca.crt", certs / "server.pem", certs / "server.key")
    commands = [
        superlink_command(8000),
        superlink_command(8000, tls=tls),
        superlink_command(8000, tls=tls, supernode_auth=True),
        supernode_command("127.0.0.1:8000", 9094, 0, 2, insecure=True),
        supernode_command("127.0.0.1:8000", 9095, 1, 2, insecure=True),
        supernode_command("127.0.0.1:8000", 9094, 0, 2, root_certificates=tls.ca_cert),
        supernode_command(
            "127.0.0.1:8000",
            9094,
            0,
            2,
            root_certificates=tls.ca_cert,
            auth_key=Path("keys/node0"),
        ),
    ]
    for cmd in commands:
        shown = shlex.join([Path(cmd[0]).name, *cmd[1:]])
        assert shown in docs, f"docs/deployment.md lacks: {shown}"
    assert "flwr supernode register keys/node0.pub local-deploy" in docs
    assert "flwr run . local-deploy" in docs


# -- slow: real deployments over loopback ----------------------------------------------------
@pytest.mark.slow
def test_insecure_deployment_gives_the_local_engine_results(tmp_path, deployment):
    app_dir = copy_app(tmp_path / "app")
    fed = deployment()
    assert fed.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    fed.start_superlink()
    nodes = [fed.start_supernode(i, 2) for i in range(2)]
    run_dir = submit(fed, app_dir, tmp_path / "runs")
    rows = check_results(run_dir, {})
    for node in nodes:  # every SuperNode trained once per round: no simulation anywhere
        assert node.output().count(RECEIVED_TRAIN) == 2, node.output()[-2000:]
    assert_same_as_local_engine(rows, tmp_path)
    stop_and_check(fed)


@pytest.mark.slow
def test_tls_deployment_runs_fedwsa_and_refuses_an_untrusting_supernode(tmp_path, deployment):
    app_dir = copy_app(tmp_path / "app")
    fed = deployment(tls=True)
    fed.start_superlink()
    assert fed.tls is not None
    # The SuperLink's port speaks TLS with the test's certificate for 127.0.0.1.
    ctx = ssl.create_default_context(cafile=fed.tls.ca_cert)
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            assert ("IP Address", "127.0.0.1") in tls_sock.getpeercert()["subjectAltName"]
    conn = tomllib.loads((fed.flwr_home / "config.toml").read_text())["superlink"][fed.name]
    assert "insecure" not in conn and Path(conn["root-certificates"]).is_absolute()

    nodes = [fed.start_supernode(i, 2) for i in range(2)]
    untrusting = fed.start_supernode(0, 2, name="untrusting", trust_ca=False)
    overrides = {"strategy": "fedwsa", "wsa-lambda": 1.0}
    run_dir = submit(fed, app_dir, tmp_path / "runs", **overrides)
    rows = check_results(run_dir, overrides)
    assert all(r["wsa-target-sigma"] for r in rows[1:])  # the target scope went round trip
    for node in nodes:
        assert node.output().count(RECEIVED_TRAIN) == 2, node.output()[-2000:]
    # Without the CA, a SuperNode does not trust the SuperLink's certificate and gives up.
    assert untrusting.wait(120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting.output()
    assert RECEIVED_TRAIN not in untrusting.output()
    assert_same_as_local_engine(rows, tmp_path, **overrides)
    stop_and_check(fed)


@pytest.mark.slow
def test_supernode_auth_admits_registered_supernodes_only(tmp_path, deployment):
    app_dir = copy_app(tmp_path / "app")
    # Flower itself refuses authentication without TLS.
    refused = start_process(
        "no-tls",
        superlink_command(free_ports(1)[0], supernode_auth=True),
        log_dir=tmp_path,
        env=flower_env(tmp_path / "no-tls-home"),
        cwd=tmp_path,
    )
    try:
        assert refused.wait(120) != 0
    finally:
        refused.stop()
    assert "requires encrypted TLS" in refused.output()

    fed = deployment(tls=True, supernode_auth=True)
    fed.start_superlink()
    keys = [make_supernode_keys(fed.work_dir / "keys", f"node{i}") for i in range(3)]
    registered = {fed.register_supernode(public) for _, public in keys[:2]}
    assert len(registered) == 2
    nodes = [fed.start_supernode(i, 2, auth_key=keys[i][0]) for i in range(2)]
    intruder = fed.start_supernode(0, 2, auth_key=keys[2][0], name="unregistered")
    keyless = fed.start_supernode(1, 2, name="keyless")  # would register itself: not allowed

    run_dir = submit(fed, app_dir, tmp_path / "runs", **{"num-rounds": 1})  # admission is the point
    check_results(run_dir, {"num-rounds": 1})
    # The registered SuperNodes did the work, as the node ids the SuperLink gave them show.
    ids = {int(m) for n in nodes for m in re.findall(r"SuperNode ID: (\d+)", n.output())}
    assert ids == registered
    for node in nodes:
        assert node.output().count(RECEIVED_TRAIN) == 1, node.output()[-2000:]
    # The others were refused at connection and exited with Flower's connection error.
    assert intruder.wait(120) != 0 and keyless.wait(120) != 0
    assert "Failed to activate SuperNode" in intruder.output()
    assert "must be registered via the CLI" in keyless.output()
    for refused_node in (intruder, keyless):
        assert "Exit Code: 305" in refused_node.output()
        assert RECEIVED_TRAIN not in refused_node.output()
    listed = {int(n["node-id"]): n["status"] for n in fed.list_supernodes()}
    assert listed == dict.fromkeys(registered, "online")
    stop_and_check(fed)
