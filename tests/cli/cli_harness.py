"""What the CLI tests that run a `moe-cluster` under `moe-client load` share: their arguments,
a small checkpoint, the cluster's pids, and the checks they collect."""
import os
import re
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "../../client/python"))
import local_cluster  # noqa: E402,F401  (re-exported for the tests)

__all__ = ["Checks", "codes", "local_cluster", "router_pid", "service_pid", "setup", "shard_pid",
           "small_checkpoint", "start_cluster", "stop_cluster"]


class Checks:
    """Failed expectations, collected so that one run reports all of them."""

    def __init__(self):
        self.failures = []

    def expect(self, cond, what):
        if not cond:
            self.failures.append(what)

    def services_clean(self, stderr_path):
        """Copies the services' stderr into the test's log; a sanitizer report in it fails."""
        text = open(stderr_path).read()
        print(text)
        self.expect("Sanitizer" not in text, "a service's stderr holds a sanitizer report")

    def finish(self, passed_line):
        if self.failures:
            print("FAILED:\n- " + "\n- ".join(self.failures))
            sys.exit(1)
        print(passed_line)


def setup(argv):
    """(bin_dir, moe-client path, work dir) from the test's BUILD_DIR WORK_DIR arguments."""
    build, work = argv[1], argv[2]
    bin_dir = os.path.join(build, "bin")
    os.makedirs(work, exist_ok=True)
    return bin_dir, os.path.join(bin_dir, "moe-client"), work


def small_checkpoint(client, work):
    """A random checkpoint of 8 experts, d_model 64, in `work`."""
    ck = os.path.join(work, "ck.safetensors")
    subprocess.run([client, "init-checkpoint", "--out", ck, "--experts", "8", "--d-model", "64",
                    "--d-ff", "128", "--top-k", "2", "--seed", "3"], check=True,
                   stdout=subprocess.DEVNULL)
    return ck


def start_cluster(bin_dir, ck, work, *args):
    """`moe-cluster --checkpoint CK ARGS...` (local_cluster.start), its services' stderr in
    WORK/moe-cluster.stderr, kept as process.log; returns (process, router address)."""
    log = open(f"{work}/moe-cluster.stderr", "w+")
    cluster, router = local_cluster.start(bin_dir, ck, *args, stderr=log)
    cluster.log = log
    return cluster, router


def stop_cluster(cluster, checks):
    """Stops a start_cluster cluster (SIGTERM stops every service), then copies its services'
    stderr into the test's log, failing `checks` on a sanitizer report in it."""
    cluster.terminate()
    cluster.wait(timeout=30)
    cluster.log.close()
    checks.services_clean(cluster.log.name)


def service_pid(cluster, service):
    """The pid of `service` ("router", "shard 1", ...), from the lines moe-cluster printed
    before READY."""
    return int(re.search(rf"^{service} addr=\S+ pid=(\d+)$", "\n".join(cluster.services),
                         re.M).group(1))


def service_addr(cluster, service):
    """The address of `service` ("coordinator", "shard 1", ...), from the lines moe-cluster
    printed before READY."""
    return re.search(rf"^{service} addr=(\S+) ", "\n".join(cluster.services), re.M).group(1)


def router_pid(cluster):
    return service_pid(cluster, "router")


def shard_pid(cluster, i):
    return service_pid(cluster, f"shard {i}")


def codes(table):
    """{code: requests} from load's closing table."""
    return {c: int(n) for c, n in re.findall(r"^([A-Z_]+)\s+(\d+)\b", table, re.M)}
