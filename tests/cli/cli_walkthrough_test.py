#!/usr/bin/env python3
"""A user's walk through the command-line tools against a real local cluster, as the README
shows them: moe-cluster, then every moe-client command on its success path, each checked by
what it prints or writes, and SIGINT ending the cluster with exit code 0.

- `info` and `placement` print the model and the placement table the router reports;
- `forward --router` writes the same numbers as `forward --local` (1e-5) on the same tokens;
- `load` prints its closing table, every request OK, also when Ctrl-C stops it early;
- `train` runs from a tokens and a grad_output file and from a synthetic target, a row per step,
  and Ctrl-C stops it between steps with the table of the steps taken;
- `save-checkpoint` writes a checkpoint whose replicas are identical, and whose weights moved
  by the steps taken; a relative path is the client's directory's;
- `drain` takes a shard out of rotation, and `info` then shows it "not serving (drains)", not DOWN;
- a user's mistakes (a shard's address for the router's, a checkpoint of another model, NaN
  tokens, tokens from a file that is not safetensors or holds no 'tokens', bad flag values, an
  output path that is a directory, a port out of range or in use, --shards out of range,
  --require-client-cert without TLS, a token file that cannot be read, a router address that
  does not resolve or is not gRPC, a request too large to send, a load whose every request
  fails) each get an error saying what went wrong, and a failed write leaves no temporary file.

usage: cli_walkthrough_test.py BUILD_DIR WORK_DIR
"""
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

build, work = sys.argv[1], sys.argv[2]
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "../../client/python"))
sys.path.insert(0, os.path.join(here, "../torch"))
import local_cluster  # noqa: E402
import st  # noqa: E402

bin_dir = os.path.join(build, "bin")
client = os.path.join(bin_dir, "moe-client")
os.makedirs(work, exist_ok=True)
failures = []


def path(name):
    return os.path.join(work, name)


def run(*args):
    """moe-client ARGS; its stdout, or a failure recorded with its stderr."""
    p = subprocess.run([client, *args], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        failures.append(f"moe-client {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def expect(cond, what):
    if not cond:
        failures.append(what)


@contextlib.contextmanager
def alone(binary, *args):
    """BINARY (moe-router or moe-expert-server) started on its own on a free loopback port, with
    the checkpoint and ARGS: yields its HOST:PORT (None, a failure recorded, if it did not say
    where it listens); stopped after."""
    proc = subprocess.Popen([os.path.join(bin_dir, binary), "--checkpoint", path("ck.safetensors"),
                             *args, "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # Killed if it says nothing for 30 s, so that the readline below cannot wait for good.
    guard = threading.Timer(30, proc.kill)
    guard.start()
    try:
        listening = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
        guard.cancel()
        expect(listening is not None, f"{binary} did not say where it listens")
        yield f"127.0.0.1:{listening.group(1)}" if listening else None
    finally:
        guard.cancel()
        proc.terminate()
        proc.wait(timeout=30)


E, D = 8, 32
run("init-checkpoint", "--out", path("ck.safetensors"), "--experts", str(E), "--d-model", str(D),
    "--d-ff", "48", "--top-k", "2", "--gated", "--seed", "11")
cluster_err = open(path("cluster.err"), "w")
cluster, router = local_cluster.start(bin_dir, path("ck.safetensors"), "--shards", "3",
                                      "--placement", "hybrid", "--no-restart",
                                      stderr=cluster_err)
try:
    info = run("info", "--router", router)
    expect(f"model: {E} experts, d_model {D}, d_ff 48, top-2" in info, f"info:\n{info}")
    expect("placement: hybrid, version 1" in info, f"info placement:\n{info}")
    expect(re.search(r"^training: coordinator 127\.0\.0\.1:\d+, connected$", info,
                     re.M), f"info should name the coordinator:\n{info}")
    expect(re.search(r"^placement lease: held \(renewed \d+(\.\d+)?(ms|s)? ago\)$", info, re.M),
           f"info should say the router holds the placement lease:\n{info}")
    expect(len(re.findall(r"^\d+\s+127\.0\.0\.1:\d+\s+up\s", info, re.M)) == 3,
           f"info should list 3 shards up:\n{info}")

    placement = run("placement", "--router", router)
    rows = re.findall(r"^(\d+)\s+([\d,]+)\s+[\d.]+$", placement, re.M)
    expect(len(rows) == E, f"placement table: {len(rows)} expert rows:\n{placement}")
    expect(len(re.findall(r"^\d+\s+127\.0\.0\.1:\d+\s+[\d.]+$", placement, re.M)) == 3,
           f"placement table should list 3 shards:\n{placement}")
    # hybrid: the first half of the experts on every shard, the rest on one each.
    replicas = {int(e): s.split(",") for e, s in rows}
    expect(all(len(replicas[e]) == 3 for e in range(E // 2)) and
           all(len(replicas[e]) == 1 for e in range(E // 2, E)),
           f"hybrid placement wrong: {replicas}")
    # demo --zipf runs the in-process layer on the tokens `load --zipf` sends: reversed
    # popularity makes the last expert the most assigned.
    demo = run("demo", "--checkpoint", path("ck.safetensors"), "--zipf", "1.2", "--hot-order",
               "-1", "--batches", "4", "--batch-size", "256")
    shares = {int(e): float(p) for e, p in re.findall(r"^(\d+)\s+\d+\s+([\d.]+)%$", demo, re.M)}
    expect(len(shares) == E and max(shares, key=shares.get) == E - 1 and
           shares[E - 1] > 2 * shares[0], f"demo --zipf 1.2 --hot-order -1:\n{demo}")
    # A dry run's proposal has no version (it read "version 0"), and says it is not applied.
    proposal = run("placement", "--router", router, "--rebalance", "sharded", "--dry-run")
    expect(re.match(r"placement sharded, a proposal, not applied, imbalance \d+\.\d+\n",
                    proposal) is not None and "version" not in proposal,
           f"placement --dry-run:\n{proposal}")
    expect(run("placement", "--router", router).startswith("placement hybrid, version 1, "),
           "a dry run applied its proposal")

    run("make-tokens", "--out", path("in.safetensors"), "--tokens", "20", "--d-model", str(D))
    run("forward", "--input", path("in.safetensors"), "--output", path("remote.safetensors"),
        "--router", router)
    run("forward", "--input", path("in.safetensors"), "--output", path("local.safetensors"),
        "--local", "--checkpoint", path("ck.safetensors"))
    remote, _ = st.load(path("remote.safetensors"))
    local, _ = st.load(path("local.safetensors"))
    expect(remote["output"].shape == (20, D), f"forward output shape {remote['output'].shape}")
    expect(np.allclose(remote["output"], local["output"], rtol=1e-5, atol=1e-5),
           "forward --router and --local differ")
    expect((remote["expert_ids"] == local["expert_ids"]).all(), "expert_ids differ")

    load = run("load", "--router", router, "--requests", "30", "--concurrency", "2",
               "--batch-size", "8")
    for line in (r"^requests\s+30$", r"^errors\s+0$"):
        expect(re.search(line, load, re.M) is not None, f"load table lacks {line!r}:\n{load}")
    expect(re.search(r"^p99 latency \(ms\)\s+[\d.]+$", load, re.M) is not None,
           f"load table lacks p99:\n{load}")
    expect(re.search(r"^OK\s+30$", load, re.M) is not None, f"load codes:\n{load}")
    # Ctrl-C stops a load early: what was sent is answered, the table still comes, and then the
    # process ends by SIGINT, as a shell loop around it expects.
    p = subprocess.Popen([client, "load", "--router", router, "--duration", "20",
                          "--batch-size", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    first = ""
    while " 10%" not in first:  # the progress line at 10 %: answers have come back by then
        first = p.stderr.readline()
        if not first:
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    expect(p.returncode == -signal.SIGINT and "interrupted after" in out and
           re.search(r"^errors\s+0$", out, re.M) is not None,
           f"load stopped by SIGINT: exit {p.returncode}:\n{out}{first}{err}")

    tokens, _ = st.load(path("in.safetensors"))
    rng = np.random.default_rng(3)
    st.save(path("grad.safetensors"),
            {"grad_output": rng.uniform(-1, 1, tokens["tokens"].shape).astype(np.float32)})
    trained = run("train", "--router", router, "--steps", "2", "--learning-rate", "0.05",
                  "--tokens", path("in.safetensors"), "--grad-output", path("grad.safetensors"))
    expect(len(re.findall(r"^\d+\s+-\s+[\d.]+\s+[\d.]+$", trained, re.M)) == 2,
           f"train from files should print 2 steps:\n{trained}")
    # The same with a grad_output file that moe-client makes.
    run("make-tokens", "--out", path("grad2.safetensors"), "--tokens", "20", "--d-model", str(D),
        "--seed", "8", "--name", "grad_output")
    trained = run("train", "--router", router, "--steps", "1", "--learning-rate", "0.05",
                  "--tokens", path("in.safetensors"), "--grad-output", path("grad2.safetensors"))
    expect(len(re.findall(r"^\d+\s+-\s+[\d.]+\s+[\d.]+$", trained, re.M)) == 1,
           f"train from a made grad_output file should print 1 step:\n{trained}")
    synthetic = run("train", "--router", router, "--steps", "3", "--synthetic",
                    "--batch-size", "16")
    losses = [float(m) for m in re.findall(r"^\d+\s+([\d.]+)\s+[\d.]+\s+[\d.]+$", synthetic,
                                           re.M)]
    expect(len(losses) == 3, f"synthetic train should print 3 losses:\n{synthetic}")
    # A step whose gradient, or its update at the learning rate, would not be finite: refused
    # at once (not retried), naming the expert, and no weight changes (the save below still
    # reads step 6).
    def refused_step(name, grad_output, rate, why):
        st.save(path(name), {"grad_output": grad_output})
        p = subprocess.run([client, "train", "--router", router, "--steps", "1",
                            "--learning-rate", rate, "--tokens", path("in.safetensors"),
                            "--grad-output", path(name)],
                           capture_output=True, text=True, timeout=120)
        expect(p.returncode == 1 and
               re.search(r"^moe-client train: step 1 of 1: OUT_OF_RANGE: backward on shard "
                         r"\S+: the " + why + r": the model has diverged or grad_output is too "
                         r"large; lower the learning rate; step aborted, no weight changed$",
                         p.stderr, re.M) is not None and "not taken" not in p.stderr,
               f"train with {name}: exit {p.returncode}: {p.stderr.strip()}")

    shape = tokens["tokens"].shape
    refused_step("huge-grad.safetensors", np.full(shape, np.finfo(np.float32).max, np.float32),
                 "0.05", r"gradient of expert \d+ is not finite \([\w.]+\[\d+\] is "
                 r"(NaN|infinite)\)")
    refused_step("large-grad.safetensors", rng.uniform(-1e30, 1e30, shape).astype(np.float32),
                 "1e10", r"update of expert \d+ by its gradient at learning rate 1e\+10 is not "
                 r"finite \([\w.]+\[\d+\]\)")

    saved = run("save-checkpoint", "--router", router, "--path", path("trained.safetensors"))
    expect("after step 6; replicas identical: yes" in saved, f"save-checkpoint: {saved}")
    before, _ = st.load(path("ck.safetensors"))
    after, _ = st.load(path("trained.safetensors"))
    expect(set(before) == set(after), "the saved checkpoint has other tensors")
    moved = [n for n in before if not np.array_equal(before[n], after[n])]
    expect(len(moved) > 0, "no weight moved after 5 steps")
    # A relative path is the router's working directory's (the cluster's here, this test's):
    # the line names the file whole.
    rel = subprocess.run([client, "save-checkpoint", "--router", router, "--path",
                          "cli-walkthrough-rel.safetensors"], capture_output=True, text=True,
                         timeout=120, cwd=work)
    wrote = re.search(r"^wrote (/\S+) \(on the router's host, in its working directory\)",
                      rel.stdout, re.M)
    expect(rel.returncode == 0 and wrote is not None and
           os.path.basename(wrote.group(1)) == "cli-walkthrough-rel.safetensors" and
           os.path.samefile(os.path.dirname(wrote.group(1)), os.getcwd()),
           f"save-checkpoint --path cli-walkthrough-rel.safetensors: exit {rel.returncode}: "
           f"{rel.stdout}{rel.stderr}")
    if wrote is not None and os.path.exists(wrote.group(1)):
        os.remove(wrote.group(1))
    # Ctrl-C stops a training run between steps: the table of the steps taken, then SIGINT.
    p = subprocess.Popen([client, "train", "--router", router, "--synthetic", "--steps",
                          "100000", "--batch-size", "8"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    first = p.stderr.readline()  # the progress line after the first step
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    stopped = re.search(r"^interrupted after (\d+) of 100000 steps", out, re.M)
    steps_shown = re.findall(r"^\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M)
    expect(p.returncode == -signal.SIGINT and stopped is not None and
           int(stopped.group(1)) >= 1 and len(steps_shown) == int(stopped.group(1)),
           f"train stopped by SIGINT: exit {p.returncode}:\n{out[-2000:]}{first}{err}")

    # A user's mistakes: each gets an error that says what went wrong, and exit 2 for a bad
    # command line (pointing to the command's help) or 1 for anything else (no help hint).
    def fails(*args, says, code=1):
        p = subprocess.run([client, *args], capture_output=True, text=True, timeout=120)
        hinted = "(run `moe-client help" in p.stderr
        expect(p.returncode == code and says in p.stderr and hinted == (code == 2),
               f"moe-client {' '.join(args)}: exit {p.returncode}, stderr {p.stderr.strip()!r}; "
               f"expected exit {code} and an error saying {says!r}")

    shard = re.search(r"^\d+\s+(127\.0\.0\.1:\d+)\s+up\s", info, re.M).group(1)
    # Another service's address: said which one it is.
    fails("info", "--router", shard,
          says="does not serve this call: that is an expert shard's address")
    fails("drain", "--addr", router, says="does not serve this call: that is a router's address")
    # Finite tokens so large that the gated experts overflow: no output is written that is not
    # finite, through the router or locally (a forward wrote NaN and exited 0).
    st.save(path("large-in.safetensors"), {"tokens": np.full((2, D), 1e36, np.float32)})
    for where in (["--router", router], ["--local", "--checkpoint", path("ck.safetensors")]):
        fails("forward", *where, "--input", path("large-in.safetensors"), "--output",
              path("large-out.safetensors"),
              says="forward: OUT_OF_RANGE: the output of token 0 is not finite")
    run("init-checkpoint", "--out", path("other.safetensors"), "--experts", "4", "--d-model",
        str(D), "--d-ff", "8", "--top-k", "2")
    fails("load", "--router", router, "--checkpoint", path("other.safetensors"), "--zipf", "1.2",
          "--requests", "2", says="give the checkpoint the cluster was started with")
    st.save(path("nan.safetensors"), {"tokens": np.full((2, D), np.nan, np.float32)})
    fails("forward", "--input", path("nan.safetensors"), "--output", path("nan-out.safetensors"),
          "--local", "--checkpoint", path("ck.safetensors"), says="tokens[0, 0] is NaN")
    # Another kind of file given as the tokens: said not to be safetensors at all (it was
    # "truncated"), or what it holds instead of 'tokens' (here forward's own output).
    with open(path("hello.txt"), "w") as hello:
        hello.write("hello\n")
    fails("forward", "--input", path("hello.txt"), "--output", path("hello-out.safetensors"),
          "--local", "--checkpoint", path("ck.safetensors"),
          says=f"moe-client forward: {path('hello.txt')}: not a safetensors file (6 bytes, "
               "shorter than the 8-byte header length)\n")
    fails("infer", "--input", path("remote.safetensors"), "--output", path("again.safetensors"),
          "--router", router,
          says=f"moe-client infer: {path('remote.safetensors')}: needs a tensor 'tokens' "
               "[N, d_model] (3 tensors: expert_ids, output, weights)\n")
    st.save(path("rank3.safetensors"), {"tokens": np.zeros((2, 2, D), np.float32)})
    fails("forward", "--input", path("rank3.safetensors"), "--output", path("r3.safetensors"),
          "--local", "--checkpoint", path("ck.safetensors"),
          says=f"moe-client forward: {path('rank3.safetensors')}: needs a tensor 'tokens' "
               f"[N, d_model], got [2, 2, {D}]\n")
    fails("load", "--router", router, "--zipf", "nan", says="--zipf must be a finite number", code=2)
    fails("load", "--router", router, "--requests", "0", says="--requests must be >= 1", code=2)
    fails("info", "--router", "127.0.0.1", says="give HOST:PORT with a port in [1, 65535]", code=2)
    fails("info", "--router", "127.0.0.1:99999", says="give HOST:PORT with a port in [1, 65535]",
          code=2)
    fails("load", "--router", router, "--hot-order", "3", says="give --zipf S", code=2)
    fails("load", "--router", router, "--concurrency", "99999999999",
          says="--concurrency must be at most 1024", code=2)
    fails("placement", "--router", router, "--rebalance", "bogus",
          says="--rebalance: placement strategy 'bogus' is not one of", code=2)
    fails("forward", "--input", path("in.safetensors"), "--output", path("neg.safetensors"),
          "--local", "--checkpoint", path("ck.safetensors"), "--capacity-factor", "-1",
          says="--capacity-factor must be >= 0", code=2)
    fails("train", "--router", router, "--synthetic", "--batch-size", "2000000",
          says=f"a training step of 2000000 tokens is more than router {router} takes in one "
               "(8192, its --max-batch-tokens): lower --batch-size", code=2)
    fails("train", "--router", router, "--synthetic", "--aux-loss-coef", "-1",
          says="--aux-loss-coef must be >= 0", code=2)
    # grad_output with another number of rows than tokens: said so (it blamed the d_model).
    rows = tokens["tokens"].shape[0]
    st.save(path("grad-short.safetensors"),
            {"grad_output": rng.uniform(-1, 1, (rows - 1, D)).astype(np.float32)})
    fails("train", "--router", router, "--steps", "1", "--tokens", path("in.safetensors"),
          "--grad-output", path("grad-short.safetensors"),
          says=f"tokens has {rows} rows and grad_output {rows - 1}: they need as many")
    fails("save-checkpoint", "--router", router, "--path", "",
          says="--path is empty: give it a value", code=2)
    fails("help", "bogus", says="unknown command 'bogus'", code=2)
    fails("health", "--addr", shard, "--require-client-cert",
          says="moe-client health: --require-client-cert needs --tls-cert, --tls-key and "
               "--tls-ca (run `moe-client help health`)\n", code=2)
    fails("info", "--router", router, "--bogus", "1", says="(run `moe-client help info`)",
          code=2)
    # Only where this machine's resolver answers at once (a resolver that drops the query
    # outlasts the call's deadline, and the error is then a deadline, not a name).
    resolved = []
    probe = threading.Thread(target=lambda: resolved.append(
        subprocess.run(["getent", "hosts", "no-such-host.invalid"], capture_output=True,
                       timeout=10).returncode), daemon=True)
    probe.start()
    probe.join(2)
    if resolved and resolved[0] != 0:
        fails("info", "--router", "no-such-host.invalid:50051",
              says="its host name does not resolve")
    else:
        print("skipped the unresolvable host check: this machine's resolver is slow to answer")
    # Something that is not gRPC (an HTTP/1 server, such as a /metrics port).
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        http.listen()

        def answer_http():
            while True:
                try:
                    c = http.accept()[0]
                except OSError:  # closed: the checks are over
                    return
                c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                c.close()

        threading.Thread(target=answer_http, daemon=True).start()
        not_grpc = f"127.0.0.1:{http.getsockname()[1]}"
        fails("info", "--router", not_grpc, says="something listens there but does not speak gRPC")
        fails("health", "--addr", not_grpc,
              says="something listens there but does not speak gRPC (a /metrics port?); give the "
                   "service's gRPC port")
        fails("drain", "--addr", not_grpc, "--timeout-ms", "1000",
              says="something listens there but does not speak gRPC (a /metrics port?); give the "
                   "shard's gRPC port")
    # --zipf 0 with the checkpoint: every expert equally popular, through the gate.
    uniform = run("load", "--router", router, "--checkpoint", path("ck.safetensors"), "--zipf",
                  "0", "--requests", "4", "--batch-size", "8")
    expect(re.search(r"^errors\s+0$", uniform, re.M) is not None, f"load --zipf 0:\n{uniform}")
    # The path is the router's: a directory the router's host lacks is said to be there.
    missing = path("no-such-dir/x.safetensors")
    fails("save-checkpoint", "--router", router, "--path", missing,
          says=f"on the router's host, {missing}: cannot open for writing: No such file or "
               "directory")
    # Over the checkpoint the cluster serves: refused (every --state-dir kept from it would be
    # ignored at the next start), and the file is left as it was.
    before = open(path("ck.safetensors"), "rb").read()
    fails("save-checkpoint", "--router", router, "--path", path("ck.safetensors"),
          says=f"save-checkpoint: {path('ck.safetensors')} is the checkpoint this router "
               "serves (--checkpoint ")
    expect(open(path("ck.safetensors"), "rb").read() == before,
           "a refused save-checkpoint changed the cluster's checkpoint")
    # Into a --state-dir (a shard's holds .lock, a router's gate.lock): refused, nothing written
    # (over a shard's expert file, the shard lost that expert's training at its next start).
    for lock, whose in ((".lock", "shard"), ("gate.lock", "router")):
        kept = path("kept-" + whose)
        os.makedirs(kept, exist_ok=True)
        open(os.path.join(kept, lock), "w").close()
        into = os.path.join(kept, "expert-0.safetensors")
        fails("save-checkpoint", "--router", router, "--path", into,
              says=f"save-checkpoint: {into} is in {kept}, a --state-dir: it holds {lock}, as a "
                   f"{whose}'s does; a file written there could take the place of the training "
                   "it keeps: save to another directory")
        expect(not os.path.exists(into), f"a refused save-checkpoint wrote {into}")
    # A flag of forward's other mode is refused, not ignored: the router drops nothing for a
    # client's --capacity-factor (it has its own), and --local sends nothing as BF16.
    fails("forward", "--input", path("in.safetensors"), "--output", path("cf.safetensors"),
          "--router", router, "--capacity-factor", "1.0",
          says="--capacity-factor applies to forward --local only", code=2)
    fails("forward", "--input", path("in.safetensors"), "--output", path("bf.safetensors"),
          "--local", "--checkpoint", path("ck.safetensors"), "--bf16",
          says="--bf16 applies to forward --router only", code=2)
    fails("load", "--router", router, "--batch-size", "1000000", says="more than one may carry", code=2)
    # Over the router's own limit (8192 by default): told before a request is sent (each was
    # refused RESOURCE_EXHAUSTED for the whole run).
    fails("load", "--router", router, "--batch-size", "10000", "--duration", "2",
          says="moe-client load: --batch-size 10000 is over the router's limit of 8192 tokens a "
               "request (its --max-batch-tokens) (run `moe-client help load`)\n", code=2)
    # Every request refused (a router still loading its placement: its one shard does not
    # answer): the table, then exit 1.
    with alone("moe-router", "--shards", "127.0.0.1:1") as lonely:
        if lonely:
            fails("load", "--router", lonely, "--batch-size", "8", "--requests", "2",
                  says="all 2 requests failed")
            # info says why there is no placement (it printed version 0 and no shard, no word).
            lonely_info = run("info", "--router", lonely)
            expect(re.search(r"^NOT SERVING: the router is still loading its placement",
                             lonely_info, re.M) is not None,
                   f"info of a router with no placement:\n{lonely_info}")
    # A drain undone on a shard that holds nothing, and that no router places experts on,
    # leaves it NOT_SERVING: `drain --undo` waits for SERVING up to --timeout-ms, then exits 1
    # saying the undo stands (it exited 0 at once, and `undo && health` failed).
    with alone("moe-expert-server", "--experts", "none") as lone:
        if lone:
            drained_lone = run("drain", "--addr", lone, "--timeout-ms", "1000")
            expect("drained in" in drained_lone, f"drain of a lone shard: {drained_lone}")
            fails("drain", "--addr", lone, "--undo", "--timeout-ms", "300",
                  says=f"{lone}: drain undone, but still NOT_SERVING after 300 ms: it serves once "
                       "a router places experts on it")
            undone = run("drain", "--addr", lone, "--undo")
            expect("not draining, nothing to undo: NOT_SERVING until it holds experts" in undone,
                   f"a second undo: {undone}")
    fails("train", "--router", router, "--tokens", path("in.safetensors"),
          says="train needs --synthetic, or --tokens and --grad-output", code=2)
    fails("train", "--router", router, "--synthetic", "--tokens", path("in.safetensors"),
          says="--synthetic makes its own batches: give it without --tokens", code=2)
    fails("train", "--router", router, "--tokens", path("in.safetensors"), "--grad-output",
          path("in.safetensors"),
          says="needs a tensor 'grad_output' [N, d_model] (make one with moe-client make-tokens "
               "--name grad_output)")
    fails("init-checkpoint", "--out", work, "--experts", "2", "--d-model", "4", "--d-ff", "4",
          "--top-k", "1", says="cannot rename into place")
    left = [n for n in os.listdir(os.path.dirname(os.path.abspath(work)))
            if n.startswith(os.path.basename(os.path.abspath(work)) + ".tmp.")]
    expect(not left, f"a failed write left its temporary file: {left}")
    helped = subprocess.run([client, "info", "--help"], capture_output=True, text=True)
    expect(helped.returncode == 0 and "info --router HOST:PORT" in helped.stdout,
           f"info --help: exit {helped.returncode}: {helped.stdout}{helped.stderr}")
    port = subprocess.run([os.path.join(bin_dir, "moe-cluster"), "--checkpoint",
                           path("ck.safetensors"), "--router-port", "70000"],
                          capture_output=True, text=True, timeout=60)
    expect(port.returncode == 2 and "--router-port must be a port in [0, 65535]" in port.stderr,
           f"moe-cluster --router-port 70000: exit {port.returncode}: {port.stderr.strip()}")
    # Ports in use and a file that is not a checkpoint: one line naming moe-cluster's own flag
    # or file, before any service starts.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        held_port = held.getsockname()[1]
        for args, says in [
                (["--router-port", router.rsplit(":", 1)[1]],
                 f"(--router-port): port {router.rsplit(':', 1)[1]} is in use by another process"),
                (["--router-port", "0", "--metrics-port", str(held_port - 1)],
                 "/metrics) is in use by another process"),
                (["--router-port", "0", "--checkpoint", path("in.safetensors")],
                 "it holds no gate under any prefix")]:
            bad = subprocess.run([os.path.join(bin_dir, "moe-cluster"), "--checkpoint",
                                  path("ck.safetensors"), *args],
                                 capture_output=True, text=True, timeout=60)
            expect(bad.returncode == 1 and says in bad.stderr and "starting" not in bad.stderr
                   and len(bad.stderr.strip().splitlines()) == 1,
                   f"moe-cluster {' '.join(args)}: exit {bad.returncode}: {bad.stderr.strip()}")
    # moe-cluster's mistakes are told before any service starts.
    for args, says in [(["--metrics-port", "0"], "--metrics-port 0 is not supported"),
                       (["--router-port", "9401", "--metrics-port", "9400"],
                        "--router-port 9401 is in the block of --metrics-port 9400"),
                       (["--placement", "bogus"], "--placement bogus: use one of replicated"),
                       (["--shard-threads", "0"], "--shard-threads must be in [1, 256]")]:
        bad = subprocess.run([os.path.join(bin_dir, "moe-cluster"), "--checkpoint",
                              path("ck.safetensors"), *args],
                             capture_output=True, text=True, timeout=60)
        expect(bad.returncode == 2 and says in bad.stderr and "starting" not in bad.stderr and
               "(see --help)" in bad.stderr,
               f"moe-cluster {' '.join(args)}: exit {bad.returncode}: {bad.stderr.strip()}")

    def cluster_fails(args, says, code):
        """moe-cluster ARGS exits `code` before any service starts, its stderr the one line
        `says` (with --help's hint for a usage error)."""
        try:
            bad = subprocess.run([os.path.join(bin_dir, "moe-cluster"), "--checkpoint",
                                  path("ck.safetensors"), "--router-port", "0", *args],
                                 capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:  # it started the cluster and served
            failures.append(f"moe-cluster {' '.join(args)}: still running after 20 s; expected "
                            f"exit {code} saying {says!r}")
            return
        line = f"moe-cluster: {says}{' (see --help)' if code == 2 else ''}\n"
        expect(bad.returncode == code and bad.stderr == line,
               f"moe-cluster {' '.join(args)}: exit {bad.returncode}, stderr {bad.stderr!r}; "
               f"expected exit {code} and {line!r}")

    # Every --shards out of range is told so, before a port is computed from it (a --metrics-port
    # never given was said to need room for 100002 ports, and int64 overflowed).
    for n in ["0", "65", "100000", "2147483648", "9223372036854775807", "-9223372036854775808",
              "99999999999999999999"]:
        cluster_fails(["--shards", n], "--shards must be in [1, 64]", 2)
    # Mutual TLS without TLS: refused (the cluster served plaintext).
    cluster_fails(["--require-client-cert"], "--require-client-cert needs --tls-dir", 2)
    # A token file the router cannot use is told as the router tells it, before anything starts
    # (the coordinator and every shard were started first).
    cluster_fails(["--auth-token-file", path("no-such-token")],
                  f"--auth-token-file {path('no-such-token')} cannot be read", 1)
    open(path("empty-token"), "w").close()
    cluster_fails(["--auth-token-file", path("empty-token")],
                  f"--auth-token-file {path('empty-token')} is empty", 1)
    # --advertise is told only to a coordinator: without one it was accepted and ignored.
    lone_advertise = subprocess.run([os.path.join(bin_dir, "moe-expert-server"), "--checkpoint",
                                     path("ck.safetensors"), "--advertise", "127.0.0.1:1"],
                                    capture_output=True, text=True, timeout=60)
    expect(lone_advertise.returncode == 2 and
           "--advertise is the address the shard registers with its coordinator: give "
           "--coordinator too" in lone_advertise.stderr,
           f"moe-expert-server --advertise alone: exit {lone_advertise.returncode}: "
           f"{lone_advertise.stderr.strip()}")
    # A --bin-dir without the services: one line naming the program (it was three: a progress
    # line, the shell's "cannot run" and "the coordinator did not start").
    cluster_fails(["--bin-dir", work],
                  f"no program {work}/moe-coordinator to run (No such file or directory); "
                  "--bin-dir must name the directory of the built binaries (build/bin)", 1)
    # TLS files gRPC cannot use are told by flag and file before anything starts (the
    # coordinator logged gRPC's lines, then "cannot listen ... (port in use or bad address)").
    bad_certs = path("bad-certs")
    subprocess.run(["bash", os.path.join(here, "../../scripts/make-certs.sh"), bad_certs],
                   check=True, capture_output=True)
    with open(os.path.join(bad_certs, "client.key"), "rb") as src, \
            open(os.path.join(bad_certs, "server.key"), "wb") as dst:
        dst.write(src.read())
    cluster_fails(["--tls-dir", bad_certs],
                  f"--tls-dir {bad_certs}: --tls-key {bad_certs}/server.key is not the key of "
                  f"--tls-cert {bad_certs}/server.crt: give the pair made together "
                  "(scripts/make-certs.sh DIR makes the files)", 1)
    missing = path("no-certs")
    cluster_fails(["--tls-dir", missing],
                  f"--tls-dir {missing}: --tls-ca {missing}/ca.crt cannot be read "
                  "(scripts/make-certs.sh DIR makes the files)", 1)
    fails("info", "--router", router, "--tls-ca", os.path.join(bad_certs, "token"),
          says=f"moe-client info: --tls-ca {bad_certs}/token holds no PEM certificate "
               "(\"-----BEGIN CERTIFICATE-----\")\n")
    # Every binary says its version; a service given an unknown flag exits 2, pointing to
    # --help, and one given a file that is not a checkpoint exits 1, without that hint.
    for binary in ["moe-client", "moe-cluster", "moe-router", "moe-expert-server",
                   "moe-coordinator", "moe-layer-dump"]:
        v = subprocess.run([os.path.join(bin_dir, binary), "--version"], capture_output=True,
                           text=True, timeout=60)
        expect(v.returncode == 0 and re.fullmatch(rf"{binary} \d+\.\d+\.\d+\n", v.stdout),
               f"{binary} --version: exit {v.returncode}: {v.stdout!r} {v.stderr.strip()}")
    for binary in ["moe-router", "moe-expert-server", "moe-coordinator"]:
        u = subprocess.run([os.path.join(bin_dir, binary), "--bogus"], capture_output=True,
                           text=True, timeout=60)
        expect(u.returncode == 2 and u.stderr == f"{binary}: unknown flag --bogus (see --help)\n",
               f"{binary} --bogus: exit {u.returncode}: {u.stderr.strip()}")
    # --require-client-cert without a certificate to serve (no --tls-cert): refused, where each
    # service served plaintext and asked no caller for a certificate.
    for binary, args in [("moe-router", ["--checkpoint", path("ck.safetensors"), "--shards",
                                         "127.0.0.1:1"]),
                         ("moe-expert-server", ["--checkpoint", path("ck.safetensors")]),
                         ("moe-coordinator", []),
                         ("moe-coordinator", ["--tls-ca", path("no-such-ca.crt")])]:
        try:
            mtls = subprocess.run([os.path.join(bin_dir, binary), "--port", "0", *args,
                                   "--require-client-cert"], capture_output=True, text=True,
                                  timeout=20)
        except subprocess.TimeoutExpired:  # it served
            failures.append(f"{binary} {' '.join(args)} --require-client-cert: still running "
                            "after 20 s")
            continue
        expect(mtls.returncode == 2 and "listening" not in mtls.stdout and
               mtls.stderr == f"{binary}: --require-client-cert needs --tls-cert, --tls-key and "
                              "--tls-ca (see --help)\n",
               f"{binary} {' '.join(args)} --require-client-cert: exit {mtls.returncode}: "
               f"{mtls.stderr.strip()}")
    # A service's HOST:PORT flags are checked before it starts: a shard without its port was
    # retried for good (gRPC took it as port 0), a bad --coordinator or --advertise said nothing.
    for binary, args in [("moe-router", ["--shards", f"{shard},127.0.0.1"]),
                         ("moe-router", ["--coordinator", "127.0.0.1:99999"]),
                         ("moe-expert-server", ["--coordinator", "127.0.0.1"]),
                         ("moe-expert-server", ["--advertise", "shard-0"])]:
        bad = subprocess.run([os.path.join(bin_dir, binary), "--checkpoint",
                              path("ck.safetensors"), "--port", "0", *args],
                             capture_output=True, text=True, timeout=60)
        expect(bad.returncode == 2 and "give HOST:PORT with a port in [1, 65535]" in bad.stderr
               and "listening" not in bad.stdout,
               f"{binary} {' '.join(args)}: exit {bad.returncode}: {bad.stderr.strip()}")
    not_ck = subprocess.run([os.path.join(bin_dir, "moe-expert-server"), "--checkpoint",
                             path("in.safetensors"), "--port", "0"], capture_output=True,
                            text=True, timeout=60)
    expect(not_ck.returncode == 1 and "it holds no gate under any prefix" in not_ck.stderr and
           "--help" not in not_ck.stderr,
           f"moe-expert-server given a tokens file: exit {not_ck.returncode}: "
           f"{not_ck.stderr.strip()}")
    # A port another process holds: one line that says so, not gRPC's log.
    router_port = router.rsplit(":", 1)[1]
    for binary, args in [("moe-router", ["--checkpoint", path("ck.safetensors"), "--shards",
                                         shard, "--port", router_port]),
                         ("moe-expert-server", ["--checkpoint", path("ck.safetensors"),
                                                "--port", router_port])]:
        taken = subprocess.run([os.path.join(bin_dir, binary), *args], capture_output=True,
                               text=True, timeout=60)
        expect(taken.returncode == 1 and
               f"port {router_port} is in use by another process" in taken.stderr and
               max(len(line) for line in taken.stderr.splitlines()) < 300,
               f"{binary} on a port in use: exit {taken.returncode}: {taken.stderr.strip()}")
    # A drained shard answers NOT_SERVING: `info` shows it out of rotation, not DOWN.
    drained = run("drain", "--addr", shard, "--timeout-ms", "5000")
    expect("drained in" in drained, f"drain: {drained}")
    # The router sees it at its next health check of the shard (every 250 ms).
    for _ in range(60):
        info = run("info", "--router", router)
        if re.search(rf"^\d+\s+{re.escape(shard)}\s+not serving \(drains\)\s", info, re.M):
            break
        time.sleep(0.05)
    expect(re.search(rf"^\d+\s+{re.escape(shard)}\s+not serving \(drains\)\s", info, re.M)
           is not None and
           len(re.findall(r"^\d+\s+127\.0\.0\.1:\d+\s+up\s", info, re.M)) == 2,
           f"info after draining {shard}: it should read 'not serving (drains)', the others "
           f"'up':\n{info}")
    # ... and says why, under the table.
    expect(re.search(rf"^shard \d+ \({re.escape(shard)}\) out of rotation for \d+\.\d s: its "
                     r"health check says NOT_SERVING \(draining, or no expert loaded\)$",
                     info, re.M) is not None and info.count("out of rotation") == 1,
           f"info after draining {shard}: one line should say why it is out:\n{info}")
    # Ctrl-C while the services start stops them then, not once the cluster is ready: here the
    # router's only shard cannot be reached (its --shards given again: the last one counts), so
    # it never turns SERVING, and moe-cluster used to wait the 5 minutes of its start-up.
    starting = subprocess.Popen([os.path.join(bin_dir, "moe-cluster"), "--checkpoint",
                                 path("ck.safetensors"), "--router-port", "0", "--shards", "1",
                                 "--router-args", "--shards 127.0.0.1:1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in starting.stderr:
        seen.append(line)
        if "waiting for the placement to load" in line:
            break
    t0 = time.monotonic()
    starting.send_signal(signal.SIGINT)
    rest = starting.communicate(timeout=60)[1]
    took = time.monotonic() - t0
    said = "".join(seen) + rest
    print("moe-cluster stopped while starting:\n" + said)
    expect(starting.returncode == 0 and "before the cluster was ready; stopped" in said and
           "Sanitizer" not in said,
           f"Ctrl-C while starting: exit {starting.returncode}:\n{said[-2000:]}")
    expect(took < (15 if "TSAN_OPTIONS" in os.environ or "ASAN_OPTIONS" in os.environ else 3),
           f"Ctrl-C while starting took {took:.1f} s to stop the services")
except Exception as e:  # e.g. a file a failed command did not write: report it with the rest
    failures.append(f"{type(e).__name__}: {e}")
finally:
    # A shard killed under --no-restart is told when it dies and stays down; the stop then ends
    # cleanly (exit 0) and soon: each service used to take up to 2 s, its metrics endpoint's.
    pids = [int(m.group(1)) for m in (re.match(r"shard \d+ addr=\S+ pid=(\d+)$", line)
                                      for line in cluster.services) if m]
    expect(len(pids) == 3, f"moe-cluster's shard lines: {cluster.services}")
    if pids:
        os.kill(pids[-1], signal.SIGKILL)
        told = f"(pid {pids[-1]}) killed by signal 9 (SIGKILL); not started again (--no-restart)"
        for _ in range(500):
            if told in open(path("cluster.err")).read():
                break
            time.sleep(0.02)
        else:
            failures.append("moe-cluster did not report the killed shard within 10 s")
        # The line ends with the command that starts the shard again by hand (from moe-cluster's
        # working directory): run, it serves again and the router takes it back into rotation;
        # stopped, moe-cluster says nothing.
        again = None
        try:
            by_hand = re.search(r"not started again \(--no-restart\); to start it again by hand "
                                r"\(this program then neither watches nor stops it\): "
                                r"cd (\S+) && (.+)$", open(path("cluster.err")).read(), re.M)
            expect(by_hand, "moe-cluster's line on the killed shard names no command to start it")
            addr = re.search(r"^shard 2 addr=(\S+) ", "\n".join(cluster.services),
                             re.M).group(1)
            if by_hand:
                again = subprocess.Popen(shlex.split(by_hand.group(2)),
                                         cwd=shlex.split(by_hand.group(1))[0],
                                         stdout=subprocess.DEVNULL, stderr=cluster_err)
                row = ""
                for _ in range(300 if "TSAN_OPTIONS" in os.environ else 100):
                    row = next((line for line in run("info", "--router", router).splitlines()
                                if addr in line.split()), "")
                    if row.split()[2:3] == ["up"]:
                        break
                    time.sleep(0.2)
                else:
                    failures.append(f"the shard started by hand is not back in rotation: {row!r}")
                again.terminate()
                expect(again.wait(timeout=30) == 0,
                       "the shard started by hand did not stop cleanly")
        except Exception as e:
            failures.append(f"starting the shard again by hand: {type(e).__name__}: {e}")
        finally:
            if again is not None and again.poll() is None:
                again.kill()
                again.wait()
    started = time.monotonic()
    cluster.send_signal(signal.SIGINT)
    try:
        code = cluster.wait(timeout=30)
    except subprocess.TimeoutExpired:
        cluster.kill()
        code = "none (killed after 30 s)"
    took = time.monotonic() - started
    cluster_err.close()
    err = open(path("cluster.err")).read()
    # The services' stderr, for the test's log (and the sanitizer builds' check of it).
    print("moe-cluster's stderr:\n" + err)
    expect("Sanitizer" not in err, "a sanitizer reported on a service (its stderr is above)")
    expect(err.count("not started again") == 1,
           f"exactly one service should have been left down:\n{err[-2000:]}")
    expect(code == 0 and "moe-cluster: stopped" in err,
           f"moe-cluster exited with {code} on SIGINT:\n{err[-2000:]}")
    # Sanitized services run several times slower.
    limit = 15 if "TSAN_OPTIONS" in os.environ or "ASAN_OPTIONS" in os.environ else 3
    expect(took < limit, f"moe-cluster took {took:.1f} s to stop (more than {limit} s)")
    print(f"moe-cluster stopped in {took:.2f} s after a shard was killed")

for f in failures:
    print("FAIL:", f)
print("CLI walk-through:", "all commands behaved" if not failures else f"{len(failures)} failures")
sys.exit(1 if failures else 0)
