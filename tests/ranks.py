"""Launching worker ranks for the replication and recovery tests, on 127.0.0.1 or inside
network namespaces (one per simulated node, joined by a veth pair).

``run_ranks`` starts one ``replication_worker.py`` process per rank, collects the ``RESULT`` lines
each prints and returns once every process has exited (by itself; a process still running at the
deadline is killed and the test fails). ``Network`` makes the namespaces (we run as root in CI) and
removes them, and every process left in them, whatever happens.

The worker side, for the scripts that run ``[scenario, options]`` steps (replication_worker.py,
incremental_worker.py): ``worker_main`` (join the gloo group, run the steps, exit 1 with the
traceback on any error), ``report`` (one ``RESULT`` line per scenario) and ``join_gloo``.
"""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replication_worker.py")


def free_port():
    """A port for the rendezvous, below the ephemeral range: the kernel's own pick (port 0) can be
    handed to another process's outgoing connection before rank 0's store binds it."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000..32000")


def start_ranks(world, directory, steps, *, ranks=None, port=None, host="127.0.0.1", prefix=None, env=None,
                worker=WORKER):
    """Starts the workers (all ranks, or ``ranks``; ``worker``: the script, replication_worker.py
    by default) and returns ``{rank: Popen}``."""
    port = str(port or free_port())
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", STAGER_TEST_HOST=host)
    procs = {}
    for rank in ranks if ranks is not None else range(world):
        command = [sys.executable, worker, str(rank), str(world), port, str(directory), json.dumps(steps)]
        if prefix is not None:
            command = prefix(rank) + command
        procs[rank] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**base, **(env(rank) if env else {})})
    return procs


def results_in(output):
    """Every ``RESULT {...}`` a worker printed, in order. Only the JSON object after the marker is
    read: a child process sharing the worker's stdout (dcp's PROCESS checkpointer) may write into
    the same line, before or after it."""
    decoder = json.JSONDecoder()
    for line in output.splitlines():
        at = line.find("RESULT {")
        if at >= 0:
            yield decoder.raw_decode(line, at + len("RESULT "))[0]


def parse_results(output):
    """{scenario: result} from a worker's ``RESULT`` lines."""
    return {result["scenario"]: result for result in results_in(output)}


def collect(procs, deadline=90):
    """Waits for every process; returns ``{rank: (returncode, {scenario: result}, output)}``."""
    end = time.monotonic() + deadline
    results = {}
    try:
        for rank, proc in procs.items():
            try:
                output, _ = proc.communicate(timeout=max(1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                pytest.fail(f"rank {rank} did not exit within {deadline}s:\n{output}")
            results[rank] = (proc.returncode, parse_results(output), output)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def kill_when_done(procs, scenarios, deadline=90):
    """Reads each worker's output until it reported every scenario of ``scenarios`` (the last
    scenario should linger), then SIGKILLs it: its memory dies with it, like a lost node's.
    Returns what :func:`collect` returns."""
    end = time.monotonic() + deadline
    outputs = {}
    for rank, proc in procs.items():
        lines, seen = [], set()
        while not set(scenarios) <= seen:
            if time.monotonic() > end:
                break
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            seen.update(result["scenario"] for result in results_in(line))
        outputs[rank] = "".join(lines)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    results = collect(procs, deadline=max(5, end - time.monotonic()))
    return {rank: (rc, parse_results(outputs[rank] + output), outputs[rank] + output)
            for rank, (rc, _, output) in results.items()}


def run_ranks(world, directory, steps, deadline=90, **options):
    """Runs ``world`` workers through ``steps`` ([scenario, options] pairs); see :func:`collect`."""
    return collect(start_ranks(world, directory, steps, **options), deadline)


def assert_all_ok(results, scenarios, ranks=None):
    for rank, (rc, found, output) in results.items():
        if ranks is not None and rank not in ranks:
            continue
        assert rc == 0 and all(name in found for name in scenarios), f"rank {rank} failed (rc={rc}):\n{output}"


# ---- the worker side: what a worker script started by start_ranks runs ------------------------------

_running = {"name": None}  # the scenario running now in this worker, named in its RESULT lines


def report(**fields):
    """Prints this worker's ``RESULT`` line for the scenario running now (see :func:`results_in`)."""
    print("RESULT " + json.dumps({"scenario": _running["name"], **fields}), flush=True)


def join_gloo(rank, world, port, host=None, timeout_s=60):
    """Joins the default gloo group of the workers (``host``: ``STAGER_TEST_HOST``, else 127.0.0.1)."""
    import datetime

    import torch.distributed as dist

    host = host or os.environ.get("STAGER_TEST_HOST", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def worker_main(scenarios):
    """The whole life of a worker started by :func:`start_ranks` (argv: rank, world, port,
    directory, steps): joins the gloo group, runs each ``[scenario, options]`` step as
    ``scenarios["scenario_" + scenario](rank, world, subdir, options)`` in ``directory/subdir``
    (``options["subdir"]``, else the scenario's name; reported as ``options["name"]``, else the
    subdir), and leaves the group. Anything raised ends the process at once with status 1, its
    traceback printed (the other ranks then time out of their collectives and stop too)."""
    import torch
    import torch.distributed as dist

    try:
        rank, world, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
        steps = json.loads(sys.argv[5])
        torch.set_num_threads(1)
        join_gloo(rank, world, port)
        try:
            for scenario, options in steps:
                _running["name"] = options.get("name", options.get("subdir", scenario))
                subdir = os.path.join(directory, options.get("subdir", scenario))
                os.makedirs(subdir, exist_ok=True)
                scenarios["scenario_" + scenario](rank, world, subdir, options)
        finally:
            dist.destroy_process_group()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()


# ---- network namespaces ------------------------------------------------------------------------------


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    """Two simulated nodes, each its own network namespace, joined by one veth pair
    (``10.77.<n>.1/24`` on node 0's end, ``.2`` on node 1's), with an optional netem delay and
    rate limit on both ends. ``cut()`` takes the link down. ``close()`` kills every process
    still in the namespaces and deletes them (the veth pair goes with them)."""

    def __init__(self, delay_ms=None, rate=None):
        if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
            pytest.skip("network namespaces need root and iproute2 (ip, tc): apt-get install -y iproute2")
        tag = f"{os.getpid() % 10000}{int(time.monotonic() * 1000) % 1000}"
        self.names = [f"stg{tag}n0", f"stg{tag}n1"]
        self.links = [f"stg{tag}v0", f"stg{tag}v1"]
        subnet = 1 + os.getpid() % 250
        self.addresses = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
        self.delay_note = None
        try:
            for name in self.names:
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
            for node in (0, 1):
                _ip("link", "set", self.links[node], "netns", self.names[node])
                _ip("-n", self.names[node], "addr", "add", f"{self.addresses[node]}/24", "dev", self.links[node])
                _ip("-n", self.names[node], "link", "set", self.links[node], "up")
        except subprocess.CalledProcessError as err:
            self.close()
            pytest.skip(f"cannot make network namespaces here: {' '.join(err.cmd)}: {err.stderr.strip()}")
        for node in (0, 1):
            self._shape(node, delay_ms, rate)

    def _shape(self, node, delay_ms, rate):
        tc = ["ip", "netns", "exec", self.names[node], "tc", "qdisc", "add", "dev", self.links[node], "root"]
        if delay_ms:
            args = ["netem", "delay", f"{delay_ms}ms"] + (["rate", rate] if rate else [])
            done = subprocess.run(tc + args, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                return
            self.delay_note = f"netem is not available in this kernel ({done.stderr.strip()}): no delay added"
        if rate:
            subprocess.run(tc + ["tbf", "rate", rate, "burst", "256kb", "latency", "400ms"], check=True,
                           capture_output=True, text=True)

    def node_of(self, rank, ranks_per_node):
        return min(rank // ranks_per_node, 1)

    def prefix(self, ranks_per_node):
        return lambda rank: ["ip", "netns", "exec", self.names[self.node_of(rank, ranks_per_node)]]

    def env(self, ranks_per_node):
        return lambda rank: {"GLOO_SOCKET_IFNAME": self.links[self.node_of(rank, ranks_per_node)]}

    def launch(self, world, directory, steps, ranks_per_node, ranks=None):
        """Starts the workers in their nodes' namespaces, rendezvous at node 0's address."""
        return start_ranks(world, directory, steps, ranks=ranks, host=self.addresses[0],
                           prefix=self.prefix(ranks_per_node), env=self.env(ranks_per_node))

    def cut(self, node=1):
        _ip("-n", self.names[node], "link", "set", self.links[node], "down")

    def close(self):
        for name in self.names:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", name, check=False)
        for link in self.links:  # only left in the root namespace when the setup failed half-way
            _ip("link", "del", link, check=False)
