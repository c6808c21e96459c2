"""Scale-out, as docs/scale-out.md describes it: a team tracking server (PostgreSQL + `mlflow server
--serve-artifacts`, started by mlruns_config/start_server.sh) used over HTTP, and Optuna workers on
separate network hosts sharing one study in PostgreSQL.

    pytest tests/test_scale_out.py -s     # -s also prints the trials-per-hour figures of docs/scale-out.md

Needs PostgreSQL's server programs (Debian's `postgresql`, which .ci/run installs) and the `server`
extra; the multi-host test also needs root for `ip netns`. Each test skips with its reason otherwise.
Hosts are network namespaces made here: a server host and two workers, joined by veth pairs on a
bridge in the server host, with addresses in 127.0.0.0/8 (route_localnet=1 inside each namespace
lets veth carry them). The root namespace is never changed, and nothing leaves the machine.
Every server, namespace and temporary folder made here is removed on every way out of a test.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
START_SERVER = REPO / "mlruns_config" / "start_server.sh"
SMOKE = REPO / "projects" / "quickstart" / "smoke.yaml"
PYTHON_BIN = Path(sys.executable).parent
SERVER_ADDRESS, WORKER_ADDRESSES = "127.100.0.1", ("127.100.0.11", "127.100.0.12")
TRIALS_PER_WORKER = int(os.environ.get("LORAFLOW_SCALE_OUT_TRIALS", "2"))  # docs/scale-out.md used 6


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: Debian's newest /usr/lib/postgresql/*/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_postgres() -> None:
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
    for module in ("psycopg", "psycopg2", "flask_wtf"):
        pytest.importorskip(module, reason=f"{module} is missing: pip install -e '.[server]'")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, but there is no postgres user to run PostgreSQL as")


def poll(check, *, timeout: float, what: str, alive=lambda: True, interval: float = 0.5):
    """Call `check` until it returns something truthy (returned), `alive` turns false, or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        result = check()
        if result:
            return result
        if not alive():
            raise AssertionError(f"gave up waiting for {what}: the process behind it exited")
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"{what} not reached after {timeout:.0f} s")


# --- the tracking server of mlruns_config/start_server.sh ------------------------------------------

@dataclass
class Server:
    process: subprocess.Popen
    home: Path  # LORAFLOW_SERVER_HOME: pgdata/, run/ (sockets), log/, artifacts/, secrets.env
    url: str
    pg_port: int
    netns: str | None

    def log(self) -> str:
        return (self.home / "server.log").read_text(errors="replace")

    def postgres_log(self) -> str:
        return (self.home / "log" / "postgres.log").read_text(errors="replace")

    def db_uri(self, database: str) -> str:
        """The database over the cluster's Unix socket: the test reads what the server stored from any
        network namespace (sockets live in the file system), as the cluster's superuser."""
        return f"postgresql://postgres@/{database}?host={self.home}/run&port={self.pg_port}"

    def secret(self, name: str) -> str:
        return dict(line.split("=", 1) for line in (self.home / "secrets.env").read_text().splitlines())[name]


def in_netns(netns: str | None, command: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *command] if netns else command


def answers_health(url: str, netns: str | None) -> bool:
    """GET url/health from inside `netns` (a short-lived probe there), or from here."""
    probe = f"import urllib.request; print(urllib.request.urlopen({url + '/health'!r}, timeout=3).status)"
    try:
        done = subprocess.run(in_netns(netns, [sys.executable, "-c", probe]), capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return done.stdout.strip() == "200"


def stop_server(server: Server) -> None:
    """SIGTERM the script (it stops mlflow, then PostgreSQL); kill what is left if it does not."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=30)
    if (server.home / "pgdata" / "postmaster.pid").exists():  # the script died before it could stop it
        owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*owner, str(postgres_bindir() / "pg_ctl"), "-D", str(server.home / "pgdata"), "-m",
                        "immediate", "-w", "-t", "60", "stop"], capture_output=True, timeout=90)


@contextlib.contextmanager
def tracking_server(host: str, port: int, pg_port: int, netns: str | None = None, **settings: str):
    """Run mlruns_config/start_server.sh (in `netns`, if given) on a new LORAFLOW_SERVER_HOME until it
    answers /health; yield a Server; stop everything and remove the folder afterwards."""
    require_postgres()
    home = Path(tempfile.mkdtemp(prefix="loraflow-server-"))
    home.chmod(0o755)  # the postgres user must reach pgdata/ inside it
    env = {key: value for key, value in os.environ.items()
           if key not in ("LORAFLOW_DB_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_BACKEND_STORE_URI")}
    env.update({"PATH": f"{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}", "LORAFLOW_SERVER_HOME": str(home),
                "MLFLOW_HOST": host, "MLFLOW_PORT": str(port), "PG_LISTEN": host, "PG_PORT": str(pg_port),
                "MLFLOW_WORKERS": "2", **settings})
    server = None
    try:
        with open(home / "server.log", "w") as log:
            process = subprocess.Popen(in_netns(netns, ["bash", str(START_SERVER)]), env=env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        server = Server(process, home, f"http://{host}:{port}", pg_port, netns)
        try:
            poll(lambda: answers_health(server.url, netns), timeout=240, what=f"{server.url}/health",
                 alive=lambda: process.poll() is None)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- server log ---\n{server.log()[-3000:]}") from None
        yield server
    finally:
        if server is not None:
            stop_server(server)
        shutil.rmtree(home, ignore_errors=True)


def pg_rows(server: Server, database: str, query: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"dbname={database} user=postgres host={server.home}/run port={server.pg_port}") as conn:
        return conn.execute(query, args).fetchall()


def command_lines() -> list[str]:
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            lines.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return lines


def loraflow(*args: str, env: dict | None = None, cwd: Path, netns: str | None = None,
             timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(in_netns(netns, [sys.executable, "-m", "loraflow.cli", *map(str, args)]), cwd=cwd,
                          env=env or os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"loraflow {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


# --- 1. a tracking server, used over HTTP ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.timeout(1800)
def test_quickstart_smoke_pipeline_over_http_then_served_from_the_servers_registry(tmp_path):
    """The smoke pipeline on the real SmolLM2 logs to the server, its artifacts land in the server's
    artifact store through the proxy, the model is registered there, and `loraflow serve` answers from
    models:/quickstart-smoke@champion fetched from it. Nothing downloaded from the server is left in the
    temp folder."""
    from loraflow import serving

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with tracking_server("127.0.0.1", free_port(), free_port()) as server:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "TMPDIR": str(scratch)}
        done = loraflow("pipeline", SMOKE, "--tracking-uri", server.url, "--set", "eval.bootstrap_samples=50",
                        "--set", "registry.min_improvement=-1000",  # 2 steps: register whatever they make
                        env=env, cwd=tmp_path)
        client = mlflow.MlflowClient(server.url)
        experiment = client.get_experiment_by_name("quickstart-smoke")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server decides, and proxies
        [parent] = client.search_runs([experiment.experiment_id], "tags.`loraflow.stage` = 'pipeline'")
        assert parent.info.status == "FINISHED"
        for stage in ("prepare", "train", "evaluate", "register"):
            step = client.get_run(parent.data.tags[f"loraflow.step.{stage}.run_id"])
            assert step.info.status == "FINISHED", stage
        train = client.get_run(parent.data.tags["loraflow.step.train.run_id"])
        stored = server.home / "artifacts" / experiment.experiment_id / train.info.run_id / "artifacts"
        assert (stored / "adapter" / "adapter_model.safetensors").is_file()  # on the server's disk
        assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / ".mlruns").exists()
        assert pg_rows(server, "mlflow", "SELECT status FROM runs WHERE run_uuid = %s",
                       parent.info.run_id) == [("FINISHED",)]  # the backend store is PostgreSQL
        champion = client.get_model_version_by_alias("quickstart-smoke", "champion")
        assert f"models:/quickstart-smoke/{champion.version}" in done.stdout

        port = free_port()
        with open(tmp_path / "serve.log", "w") as log:
            serve = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "serve", str(SMOKE), "--tracking-uri",
                                      server.url, "--model-uri", "models:/quickstart-smoke@champion", "--port",
                                      str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            serving.wait_until_ready(url, timeout=600, process=serve)
            [answer] = serving.predict_over_http(url, ["Write a product description for: Lumo Oak Desk Lamp"],
                                                 {"max_new_tokens": 8})
            assert isinstance(answer, str)
        finally:
            serving.stop_server(serve, timeout=60)  # its SIGTERM stops the server process first
        left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]  # torch's compile cache
        assert not left  # the register check's and the server's downloads are removed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_team_server_asks_for_a_password_it_generated_and_checks_the_host(tiny_llama, write_project, tmp_path,
                                                                             monkeypatch):
    """MLFLOW_AUTH=1: the basic-auth app with an admin password generated at first start into
    secrets.env (mode 600, on no command line); requests without it get 401, a Host header not in
    MLFLOW_SERVER_ALLOWED_HOSTS is refused, and loraflow logs with MLFLOW_TRACKING_USERNAME/PASSWORD."""
    port = free_port()
    with tracking_server("127.0.0.1", port, free_port(), MLFLOW_AUTH="1",
                         MLFLOW_SERVER_ALLOWED_HOSTS=f"127.0.0.1:{port}") as server:
        assert (server.home / "secrets.env").stat().st_mode & 0o777 == 0o600
        password, db_password = server.secret("MLFLOW_AUTH_ADMIN_PASSWORD"), server.secret("LORAFLOW_DB_PASSWORD")
        assert not any(password in line or db_password in line for line in command_lines())
        search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1"

        def status(headers: dict) -> int:
            try:
                with urllib.request.urlopen(urllib.request.Request(search, headers=headers), timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code
        basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
        assert status({}) == 401
        assert status({**basic, "Authorization": basic["Authorization"][:-4] + "AAAA"}) == 401
        assert status(basic) == 200
        assert status({**basic, "Host": "mlflow.example.org"}) == 403

        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": "admin",
               "MLFLOW_TRACKING_PASSWORD": password}
        loraflow("prepare", write_project(tiny_llama), env=env, cwd=tmp_path, timeout=300)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client = mlflow.MlflowClient(server.url)
        [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
        assert run.data.tags["loraflow.stage"] == "prepare" and run.info.status == "FINISHED"

        from mlflow.server import get_app_client  # the admin adds a user, as docs/scale-out.md shows

        alice = secrets.token_urlsafe(12)
        get_app_client("basic-auth", tracking_uri=server.url).create_user("alice", alice)
        assert status({"Authorization": "Basic " + base64.b64encode(f"alice:{alice}".encode()).decode()}) == 200


# --- 2. Optuna workers on two hosts -------------------------------------------------------------------

def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def network_hosts(prefix: str):
    """A server host and two worker hosts: network namespaces `<prefix>-srv`, `-w1`, `-w2`; a bridge in
    the server host at SERVER_ADDRESS/24; each worker's eth0 at its WORKER_ADDRESSES entry, a veth pair
    whose other end is on the bridge. Yields (server namespace, [worker namespaces]); deletes them all."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot make UTS namespaces (unshare --uts) for the workers' own hostnames")
    server_ns, workers = f"{prefix}-srv", [f"{prefix}-w{i}" for i in (1, 2)]
    made = []
    try:
        try:
            for name in (server_ns, *workers):
                ip("netns", "add", name)
                made.append(name)
                ip("-n", name, "link", "set", "lo", "up")
                # 127/8 is 'martian' on any interface but lo unless route_localnet is on (in this namespace only)
                ip("netns", "exec", name, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet")
            ip("-n", server_ns, "link", "add", "br0", "type", "bridge")
            ip("-n", server_ns, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", "br0")
            ip("-n", server_ns, "link", "set", "br0", "up")
            for number, (worker, address) in enumerate(zip(workers, WORKER_ADDRESSES), start=1):
                ip("link", "add", "eth0", "netns", worker, "type", "veth", "peer", "name", f"to-w{number}",
                   "netns", server_ns)
                ip("-n", server_ns, "link", "set", f"to-w{number}", "master", "br0", "up")
                ip("-n", worker, "addr", "add", f"{address}/24", "dev", "eth0")
                ip("-n", worker, "link", "set", "eth0", "up")
        except RuntimeError as exc:
            pytest.skip(f"cannot make the test network here: {exc}")
        yield server_ns, workers
    finally:
        for name in reversed(made):  # deleting a namespace deletes the veth ends and the bridge in it
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert not any(name in left for name in made), f"namespaces left behind: {left}"


def worker_command(netns: str, hostname: str, args: list[str]) -> list[str]:
    """`loraflow ...` on a worker host: its network namespace and a hostname of its own (a UTS namespace),
    so each worker's runs and trials name the host they ran on, as on separate machines."""
    return ["ip", "netns", "exec", netns, "unshare", "--uts", "--", sys.executable, "-c",
            "import os, socket, sys; socket.sethostname(sys.argv[1]); "
            "os.execv(sys.executable, [sys.executable, '-m', 'loraflow.cli', *sys.argv[2:]])", hostname, *args]


def run_workers(hosts: list[str], project: Path, study: str, n_trials: int, server: Server, cwd: Path,
                env: dict) -> float:
    """Start `loraflow tune` on each worker host at once; wait for all; return the wall seconds."""
    storage = f"postgresql://loraflow@{SERVER_ADDRESS}:5432/optuna"  # the password comes from PGPASSWORD
    args = ["tune", str(project), "--storage", storage, "--tracking-uri", server.url, "--study", study,
            "--n-trials", str(n_trials)]
    started = time.monotonic()
    processes = []
    try:
        for netns in hosts:
            processes.append(subprocess.Popen(worker_command(netns, f"{netns}-host", args), cwd=cwd, env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              start_new_session=True))
        outputs = [process.communicate(timeout=900) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
    assert [p.returncode for p in processes] == [0] * len(hosts), [err[-3000:] for _, err in outputs]
    return time.monotonic() - started


def steady_trials_per_hour(trials: list) -> float:
    """Trials per hour once warm, summed over workers: each worker's trials after its first (which loads
    the model and libraries) over the time from its first trial's end to its last trial's end."""
    per_hour = 0.0
    for host in {t.user_attrs["worker_host"] for t in trials}:
        ends = sorted(t.datetime_complete for t in trials if t.user_attrs["worker_host"] == host)
        if len(ends) > 1:
            per_hour += (len(ends) - 1) / ((ends[-1] - ends[0]) / datetime.timedelta(hours=1))
    return per_hour


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tune_workers_on_two_hosts_share_one_study_over_the_network(tiny_llama, write_project, tmp_path):
    """Two `loraflow tune` workers, each on its own network host, reach PostgreSQL (Optuna) and the
    tracking server on a third: the study holds the trials asked for, none lost or run twice, each a
    nested run under its own worker's study run, with one study run per worker."""
    import optuna

    require_postgres()
    project = write_project(tiny_llama, train={"max_steps": 2, "eval_steps": 1, "save_steps": 50, "eval_rows": 4},
                            tune={"r_choices": [2, 4], "alpha_multipliers": [1, 2], "lr_low": 1e-3, "lr_high": 1e-2,
                                  "pruner": "none"})
    password = secrets.token_urlsafe(18)
    with network_hosts(f"lf{os.getpid()}") as (server_ns, workers), \
            tracking_server(SERVER_ADDRESS, 5000, 5432, netns=server_ns, PG_CLIENTS=f"{SERVER_ADDRESS}/24",
                            MLFLOW_SERVER_ALLOWED_HOSTS=f"{SERVER_ADDRESS}:5000", LORAFLOW_DB_PASSWORD=password) as server:
        assert not answers_health(server.url, None)  # not reachable from this host: only over the test network
        env = {**os.environ, "PGPASSWORD": password, "MLFLOW_TRACKING_URI": server.url}
        env.pop("LORAFLOW_TUNE_WORKERS", None)
        total = 2 * TRIALS_PER_WORKER  # --n-trials is the study's total (studies.py): the two workers share it
        two_hosts_seconds = run_workers(workers, project, "two-hosts", total, server, tmp_path,
                                        {**env, "LORAFLOW_TUNE_WORKERS": "2"})  # two workers share 2 cores
        # then one worker alone, for the figures (second, on a warm server: the ratio errs low, if at all)
        one_host_seconds = run_workers(workers[:1], project, "one-host", TRIALS_PER_WORKER, server, tmp_path, env)

        storage = optuna.storages.RDBStorage(server.db_uri("optuna"))
        trials = optuna.load_study(study_name="two-hosts", storage=storage).get_trials()
        # Workers finishing at the same instant may each start one last trial (studies.py): at most one more here.
        assert total <= len(trials) <= total + 1
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        assert {t.state.name for t in trials} == {"COMPLETE"}, [
            (t.number, t.state.name, t.user_attrs.get("worker_host"), t.user_attrs.get("fail_reason"),
             t.system_attrs.get("fail_reason")) for t in trials if t.state.name != "COMPLETE"]
        run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
        assert len(set(run_ids)) == len(trials)

        client = mlflow.MlflowClient(server.db_uri("mlflow"))  # what the server stored, read from its database
        experiment = client.get_experiment_by_name("tiny")
        study_runs = client.search_runs([experiment.experiment_id], "tags.`loraflow.stage` = 'tune' and "
                                        "tags.`loraflow.study` = 'two-hosts'")
        assert len(study_runs) == 2 and {r.info.status for r in study_runs} == {"FINISHED"}
        by_id = {r.info.run_id: r for r in study_runs}
        assert {r.data.tags["loraflow.host"] for r in study_runs} == {f"{w}-host" for w in workers}
        trial_runs = client.search_runs([experiment.experiment_id], "tags.`loraflow.study` = 'two-hosts' and "
                                        "tags.`loraflow.stage` = 'train'")
        assert {r.info.run_id for r in trial_runs} == set(run_ids)
        children = {run_id: 0 for run_id in by_id}
        for run, trial in zip(sorted(trial_runs, key=lambda r: int(r.data.tags["loraflow.trial_number"])), trials):
            parent = by_id[run.data.tags["mlflow.parentRunId"]]
            assert run.data.tags["loraflow.study_run_id"] == parent.info.run_id
            assert run.data.tags["loraflow.host"] == parent.data.tags["loraflow.host"]  # its own worker's
            assert trial.user_attrs["worker_host"] == parent.data.tags["loraflow.host"]
            assert run.info.status == "FINISHED" and run.data.tags["loraflow.trial_state"] == "COMPLETE"
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
            stored = server.home / "artifacts" / experiment.experiment_id / run.info.run_id / "artifacts"
            assert (stored / "adapter" / "adapter_model.safetensors").is_file()
            children[parent.info.run_id] += 1
        assert all(count >= 1 for count in children.values()), children  # both workers ran trials

        # Each study run logs the whole study as it stood when that worker stopped (studies.py); the worker
        # that stopped last saw every trial finished: its summary is the study's.
        best = min(trials, key=lambda t: t.value)
        for run in study_runs:
            metrics = run.data.metrics
            assert metrics["tune/trials_complete"] + metrics["tune/trials_unfinished"] == metrics["tune/trials_total"]
            assert metrics["tune/trials_total"] <= len(trials)
        assert any(run.data.metrics["tune/trials_complete"] == len(trials)
                   and run.data.tags["loraflow.best_run_id"] == best.user_attrs["mlflow_run_id"]
                   and run.data.metrics["best/value"] == pytest.approx(best.value) for run in study_runs)

        for address in WORKER_ADDRESSES:  # they came over the network, from their own addresses
            assert re.search(rf"connection received: host={re.escape(address)} ", server.postgres_log())
            assert f"{address}:" in server.log()  # uvicorn's access log: "<client>:<port> - POST ..."

        one_host = optuna.load_study(study_name="one-host", storage=storage).get_trials()
        assert len(one_host) == TRIALS_PER_WORKER and {t.state.name for t in one_host} == {"COMPLETE"}
        one, two = steady_trials_per_hour(one_host), steady_trials_per_hour(trials)
        figures = {"trials_per_worker": TRIALS_PER_WORKER, "one_worker_trials_per_hour": round(one),
                   "two_workers_trials_per_hour": round(two), "ratio": round(two / one, 2),
                   "ratio_with_start_up": round((len(trials) / two_hosts_seconds) /
                                                (len(one_host) / one_host_seconds), 2)}
        print("scale-out figures:", json.dumps(figures))
