"""What the CLI tests that run a `moe-cluster` under `moe-client load` share: their arguments,
a small checkpoint, the cluster's pids, and the checks they collect."""
import os
import re
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "../../client/python"))
import local_cluster  # noqa: E402,F401  (re-exported for the tests)

__all__ = ["Checks", "codes", "local_cluster", "router_pid", "setup", "small_checkpoint"]


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


def router_pid(cluster):
    """The router's pid, from the lines moe-cluster printed before READY."""
    return int(re.search(r"^router addr=\S+ pid=(\d+)$", "\n".join(cluster.services),
                         re.M).group(1))


def codes(table):
    """{code: requests} from load's closing table."""
    return {c: int(n) for c, n in re.findall(r"^([A-Z_]+)\s+(\d+)\b", table, re.M)}
