#!/usr/bin/env python3
"""Time from a `run` command to the machine's first output line, for a cached image.

strata: `strata machine run busybox -- echo ready` (detached, like `docker run -d`), then the
machine log is watched until the line appears. The clock starts before the command and stops
when the line is in the log: what a user waits for. podman/docker (`run --rm busybox echo
ready`, attached) and a bare `runc run` of a prepared bundle are timed to their first stdout
line. The tools take turns, one sample each per round, each after a 0.2 s pause. Prints one
JSON object per tool with the samples and the median, in ms, then strata's ratio to each.

    first_output.py STRATA STORE RUNS [--podman] [--docker] [--runc-bundle DIR]
"""
import json
import os
import statistics
import subprocess
import sys
import time

PAUSE = 0.2


def strata_once(strata, store, i):
    name = f"bench-{os.getpid()}-{i}"
    log = os.path.join(store, "strata", "machines", name, "machine.log")
    t0 = time.perf_counter()
    subprocess.run([strata, "--store", store, "machine", "run", "--name", name, "busybox",
                    "--", "echo", "ready"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    while True:
        try:
            with open(log, "rb") as f:
                if b"ready\n" in f.read():
                    break
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    t = time.perf_counter() - t0
    subprocess.run([strata, "--store", store, "machine", "destroy", name], check=True,
                   stdout=subprocess.DEVNULL)
    return t


def attached_once(argv):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline()
    t = time.perf_counter() - t0
    p.wait()
    if b"ready" not in line:
        raise SystemExit(f"{argv[0]}: unexpected first line {line!r}")
    return t


def report(tool, samples):
    ms = [round(s * 1000, 1) for s in samples]
    print(json.dumps({"tool": tool, "median_ms": round(statistics.median(ms), 1),
                      "samples_ms": ms}))
    return statistics.median(samples)


def main():
    strata, store, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rest = sys.argv[4:]
    tools = {"strata machine run": lambda i: strata_once(strata, store, i)}
    if "--runc-bundle" in rest:
        bundle = rest[rest.index("--runc-bundle") + 1]
        tools["runc run (prepared bundle)"] = lambda i: attached_once(
            ["runc", "--root", f"/tmp/bench-runc-{os.getpid()}", "run", "--bundle", bundle,
             f"bench-{os.getpid()}-{i}"])
    if "--podman" in rest:
        tools["podman run --rm"] = lambda i: attached_once(
            ["podman", "run", "--rm", "--network", "host", "localhost/busybox:latest", "echo",
             "ready"])
    if "--docker" in rest:
        tools["docker run --rm"] = lambda i: attached_once(
            ["docker", "run", "--rm", "--network", "host", "busybox:latest", "echo", "ready"])
    # Warm: the agent runs and the image's snapshot exists before the clock starts; each
    # tool has run once.
    for once in tools.values():
        once("warm")
    # Round-robin: one sample of each tool per round, so that the load of this noisy machine
    # weighs on every tool alike. A pause before each sample: every start is measured on an
    # idle host (what a user starting a machine meets), not in the wake of the last one.
    samples = {name: [] for name in tools}
    for i in range(runs):
        for name, once in tools.items():
            time.sleep(PAUSE)
            samples[name].append(once(i))
    medians = {name: report(name, s) for name, s in samples.items()}
    ours = medians["strata machine run"]
    for name, m in medians.items():
        if name != "strata machine run":
            print(json.dumps({"ratio": f"strata / {name}", "of_medians": round(ours / m, 2)}))


if __name__ == "__main__":
    main()
