"""An agentd process in a temporary directory, for the benchmark scripts in this folder.

Owns building the release binaries, writing the fake GPU file and the config, starting and
stopping the agent (and any other process a benchmark starts), and HTTP over the agent's Unix
socket. Python standard library only, so the benchmarks run on a machine with just Rust and
Python installed.
"""

import base64
import http.client
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
AGENTD = os.path.join(RELEASE, "agentd")
AGENTD_SHIM = os.path.join(RELEASE, "agentd-shim")
AGENTCTL = os.path.join(RELEASE, "agentctl")
FAKE_NVML = os.path.join(RELEASE, "libfake_nvml.so")
# BENCH_LOG=debug: the agents log at that level (in their temporary directories).
LOG_LEVEL = os.environ.get("BENCH_LOG", "warn")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build():
    """Builds the release artefacts as the package has them (the replica supervisor linked
    statically, packaging/build-shim) unless BENCH_NO_BUILD=1 says they are already built."""
    if os.environ.get("BENCH_NO_BUILD") == "1":
        for path in (AGENTD, AGENTD_SHIM, AGENTCTL, FAKE_NVML):
            if not os.path.exists(path):
                sys.exit(f"BENCH_NO_BUILD=1 but {path} does not exist; build it or unset BENCH_NO_BUILD")
        if shim_linking() != "static":
            # `cargo build --release` and `cargo bench` leave a dynamically linked one.
            print(f"warning: {AGENTD_SHIM} is linked dynamically, unlike the package's; "
                  "`packaging/build-shim release` links it as the package does", file=sys.stderr)
        return
    for cmd in (["cargo", "build", "--release", "-p", "agentd", "-p", "agentctl", "-p", "fake-nvml"],
                [os.path.join(ROOT, "packaging", "build-shim"), "release"]):
        print("== " + " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)


def shim_linking():
    """'static' or 'dynamic': how target/release/agentd-shim is linked (an ELF with no
    PT_INTERP program header needs no dynamic loader)."""
    with open(AGENTD_SHIM, "rb") as f:
        elf = f.read(1 << 16)
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    for i in range(phnum):
        if int.from_bytes(elf[phoff + i * phentsize:phoff + i * phentsize + 4], "little") == 3:
            return "dynamic"
    return "static"


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gpu(index):
    """One fake GPU in the fake NVML library's JSON format (as tests/e2e writes them)."""
    return {
        "name": "NVIDIA H200",
        "uuid": f"GPU-00000000-0000-0000-0000-{index:012d}",
        "pci_bus_id": f"00000000:{0x19 + index:02X}:00.0",
        "memory_total_bytes": 150_754_820_096,
        "memory_used_bytes": 1_048_576 * index,
        "utilization_gpu": 10 * index,
        "utilization_memory": 5 * index,
        "temperature_c": 30 + index,
        "power_usage_mw": 72_000 + 1000 * index,
        "power_limit_mw": 700_000,
        "xid_events": [],
        "lost": False,
    }


class Processes:
    """Every process a benchmark starts, each in its own process group, so that all of them (and
    their children) are stopped on exit, on error and on SIGINT/SIGTERM."""

    def __init__(self):
        self.started = []
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    @staticmethod
    def _on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    def start(self, cmd, **kwargs):
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self, proc, grace=10.0):
        """SIGTERM to the process, then SIGKILL to its whole group if it outlives `grace`."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            print(f"warning: process {proc.pid} ({proc.args[0]}) did not exit", file=sys.stderr)

    def stop_all(self):
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30.0):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class Agent:
    """An agent with `gpus` fake GPUs (0: the fake library with an empty GPU list) in a fresh
    temporary directory."""

    def __init__(self, processes, gpus, config="", label="agent", metrics_addr="off"):
        self.processes = processes
        self.dir = tempfile.mkdtemp(prefix=f"bench-{label}-")
        self.socket = os.path.join(self.dir, "agentd.sock")
        self.state_dir = os.path.join(self.dir, "state")
        self.gpu_file = os.path.join(self.dir, "gpus.json")
        with open(self.gpu_file, "w") as f:
            json.dump({"driver_version": "550.54.15", "cuda_version": 12040,
                       "gpus": [fake_gpu(i) for i in range(gpus)]}, f, indent=2)
        self.config = os.path.join(self.dir, "agentd.toml")
        with open(self.config, "w") as f:
            f.write(f'metrics_addr = "{metrics_addr}"\nlog = "{LOG_LEVEL}"\n' + config)
        self.log_path = os.path.join(self.dir, "agentd.log")
        self._start()

    def _start(self):
        env = dict(os.environ, AGENTD_NVML_LIBRARY=FAKE_NVML, FAKE_NVML_CONFIG=self.gpu_file)
        env.pop("AGENTD_SOCKET", None)
        self.log = open(self.log_path, "ab")
        # BENCH_AGENT_PREFIX runs the agent under another command (`heaptrack -o FILE`, for a
        # heap profile); its RSS figures are then the wrapper's, not the agent's.
        prefix = os.environ.get("BENCH_AGENT_PREFIX", "").split()
        self.proc = self.processes.start(
            prefix + [AGENTD, "--config", self.config, "--state-dir", self.state_dir, "--socket", self.socket],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        self.pid = self.proc.pid
        self._wait_ready(30.0)

    def restart(self):
        """Stops the agent and starts it again on the same state directory."""
        self.stop()
        self._start()

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.request("GET", "/readyz", timeout=2.0)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"agentd not ready in {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def request(self, method, path, body=None, headers=None, timeout=30.0):
        """One request on a new connection; returns (status, body bytes)."""
        conn = UnixHTTPConnection(self.socket, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path):
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def ctl(self, *args):
        return subprocess.run([AGENTCTL, "--socket", self.socket, *args], capture_output=True, check=True)

    def rss_kib(self):
        return rss_kib(self.pid)

    def cpu_seconds(self):
        """utime + stime of the whole process (all threads, living and ended)."""
        return process_cpu_seconds(self.pid)

    def stop(self):
        self.processes.stop(self.proc)
        self.log.close()


def kubeconfig_with_token(admin, token, path):
    """Writes a copy of kubeconfig `admin` that authenticates with `token`."""
    with open(admin) as f, open(path, "w") as out:
        for line in f:
            if "token:" in line:
                line = line.split("token:")[0] + f"token: {token}\n"
            out.write(line)


class Audit:
    """Reads kube-sim's audit log incrementally; `records` keeps every line read."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.records = []

    def read_new(self):
        """The records written since the last call."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        self.records.extend(new)
        return new


def audit_resource(record):
    """`pods`, or `trainingjobs/status` where the request was to a subresource."""
    sub = record.get("subresource")
    return record.get("resource", "") + ("/" + sub if sub else "")


def rss_kib(pid):
    """The resident set of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS line")


def process_cpu_seconds(pid):
    """utime + stime of process `pid` (all threads, living and ended)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the comm field: state is fields[0], utime is field 14 of stat, i.e. fields[11].
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values, p):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


class Kube:
    """HTTPS requests to kube-sim with a kubeconfig's server, CA and token; one connection per
    thread, kept alive."""

    def __init__(self, kubeconfig, clients=8):
        server = ca = token = None
        with open(kubeconfig) as f:
            for line in f:
                key, _, value = line.strip().partition(":")
                value = value.strip().strip('"')
                if key == "server":
                    server = value
                elif key == "certificate-authority-data":
                    ca = base64.b64decode(value).decode()
                elif key == "token":
                    token = value
        url = urlparse(server)
        self.host, self.port = url.hostname, url.port
        self.context = ssl.create_default_context(cadata=ca)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.local = threading.local()
        self.clients = clients

    def request(self, method, path, body=None):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)
            self.local.conn = conn
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers=self.headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            self.local.conn = None
            conn.close()
            raise

    def create_all(self, path, objects):
        """Creates every object from `clients` threads; raises on any answer but 201."""
        work = queue.Queue()
        for o in objects:
            work.put(o)
        errors = []

        def run():
            while True:
                try:
                    o = work.get_nowait()
                except queue.Empty:
                    return
                status, body = self.request("POST", path(o), o)
                if status != 201:
                    errors.append(f"{o['metadata']['name']}: HTTP {status}: {body[:300]!r}")

        threads = [threading.Thread(target=run) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} creates failed, first: {errors[0]}")

    def list_items(self, path):
        status, body = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)["items"]


def stamp(record):
    """Seconds since the epoch of an audit record."""
    return datetime.strptime(record["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=timezone.utc).timestamp()


def micro_time(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wait(what, timeout, check, every=0.5):
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not within {timeout}s")
        time.sleep(every)
    return time.monotonic() - start


KUBE_SIM = os.path.join(RELEASE, "kube-sim")
AGENTD_NAMESPACE = "agentd-system"
LEADER_TOKENS = (
    'leader-token,system:serviceaccount:agentd-system:agentd-leader,sa-leader,'
    '"system:serviceaccounts,system:serviceaccounts:agentd-system"\n'
)


def build_kube_sim():
    """Builds the release kube-sim unless BENCH_NO_BUILD=1."""
    if os.environ.get("BENCH_NO_BUILD") != "1":
        subprocess.run(["cargo", "build", "--release", "-p", "kube-sim", "--bin", "kube-sim"],
                       cwd=ROOT, check=True)


class Cluster:
    """kube-sim (HTTPS, bearer tokens, RBAC, kubelet admission; packaging/kubernetes/ applied)
    with `nodes` nodes of `gpus` GPUs, and one agent on node-0 that leads and places jobs, with
    the agentd-leader ServiceAccount. The other nodes' agents are represented by their heartbeat
    Leases, written once with a duration of `lease_seconds` (a thousand agent processes do not
    fit on one small machine; bench/cluster-agents measures agents themselves)."""

    def __init__(self, processes, work, nodes, gpus, clients=8, audit_path=None,
                 lease_seconds=3600, sim_args=()):
        tokens = os.path.join(work, "tokens.csv")
        with open(tokens, "w") as f:
            f.write(LEADER_TOKENS)
        self.admin_kubeconfig = os.path.join(work, "admin.kubeconfig")
        audit = ["--audit-log", audit_path] if audit_path else []
        sim_log = open(os.path.join(work, "kube-sim.log"), "wb")
        self.sim = processes.start(
            [KUBE_SIM, "--listen", "127.0.0.1:0", "--nodes", str(nodes), "--gpus-per-node", str(gpus),
             "--tls", "--token-auth-file", tokens, "--authorization-mode", "RBAC",
             "--kubelet-admission", *audit, *sim_args, "--kubeconfig", self.admin_kubeconfig],
            stdout=subprocess.PIPE, stderr=sim_log, env=dict(os.environ, RUST_LOG="warn"))
        self.sim.stdout.readline()
        subprocess.run(["kubectl", "--kubeconfig", self.admin_kubeconfig, "apply", "-f",
                        os.path.join(ROOT, "packaging", "kubernetes")],
                       check=True, capture_output=True)
        self.kube = Kube(self.admin_kubeconfig, clients=clients)
        leader_kc = os.path.join(work, "leader.kubeconfig")
        kubeconfig_with_token(self.admin_kubeconfig, "leader-token", leader_kc)
        now = micro_time(time.time())
        self.kube.create_all(
            lambda _: f"/apis/coordination.k8s.io/v1/namespaces/{AGENTD_NAMESPACE}/leases", [
                {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": f"agentd-node-node-{i}", "namespace": AGENTD_NAMESPACE},
                 "spec": {"holderIdentity": f"node-{i}", "leaseDurationSeconds": lease_seconds,
                          "renewTime": now}}
                for i in range(1, nodes)])
        config = (f'node_name = "node-0"\nmode = "cluster"\n'
                  f'[cluster]\nkubeconfig = "{leader_kc}"\nleader_eligible = true\n'
                  f'place_jobs = true\n')
        self.leader = Agent(processes, gpus, config=config, label="leader")
        wait("node-0 leads", 60, lambda: self.leader.request("GET", "/v1/queues")[0] == 200)
        # Every node open to placement (the leader has seen every Lease).
        wait("every node schedulable", 120, lambda: sum(
            1 for n in self.leader.get_json("/v1/nodes")["nodes"]
            if n.get("schedulable") and n["agent"]["state"] == "fresh") == nodes)

    def sim_ctl(self, *args):
        """Runs a kube-sim control command (`compact`, `stop-node NODE`, ...) on this simulator."""
        return subprocess.run([KUBE_SIM, args[0], "--kubeconfig", self.admin_kubeconfig, *args[1:]],
                              check=True, capture_output=True, text=True).stdout.strip()


def training_job(name, workers, run_seconds, ttl_seconds=None, namespace="default"):
    """A TrainingJob of `workers` one-GPU workers whose pods run `run_seconds` of kube-sim's
    cluster time. Done when every worker is (successPolicy AllWorkers): on the happy path each
    pod ends by itself and none is deleted (with the default policy, worker 0's end ends the
    job and cleanPodPolicy deletes the workers still running). `ttl_seconds`: the leader
    deletes the job that long after it ends."""
    spec = {"successPolicy": "AllWorkers", "replicaSpecs": {"Worker": {
        "replicas": workers,
        "restartPolicy": "Never",
        "template": {
            "metadata": {"annotations": {"sim.agentd.io/run-seconds": str(run_seconds)}},
            "spec": {"containers": [{
                "name": "tensorflow", "image": "tf:2.16", "command": ["python", "train.py"],
                "resources": {"limits": {"nvidia.com/gpu": 1}}}]},
        }}}}
    if ttl_seconds is not None:
        spec["runPolicy"] = {"ttlSecondsAfterFinished": ttl_seconds}
    return {"apiVersion": "agentd.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def job_of(record):
    """The job an audit record is about, from the object's name: the TrainingJob and Service are
    named after the job, its pods `<job>-<type>-<index>-g<generation>`, Kubernetes Events
    `<job>.<suffix>`."""
    name = record.get("name") or ""
    resource = record.get("resource")
    if resource in ("trainingjobs", "services"):
        return name
    if resource == "pods":
        return name.rsplit("-", 3)[0]
    if resource == "events":
        return name.split(".", 1)[0]
    return None
