#!/usr/bin/env python3
"""Time from a `run` command to the machine's first output line, for a cached image.

strata: `strata machine run busybox -- echo ready` (detached, like `docker run -d`), then the
machine log is watched until the line appears. The clock starts before the command and stops
when the line is in the log: what a user waits for. podman/docker (`run --rm busybox echo
ready`, attached) and a bare `runc run` of a prepared bundle are timed to their first stdout
line. Prints one JSON object per tool with the samples and the median, in ms.

    first_output.py STRATA STORE RUNS [--podman] [--docker] [--runc-bundle DIR]
"""
import json
import os
import statistics
import subprocess
import sys
import time


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


def main():
    strata, store, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rest = sys.argv[4:]
    # Warm: the agent runs and the image's snapshot exists before the clock starts.
    strata_once(strata, store, "warm")
    report("strata machine run", [strata_once(strata, store, i) for i in range(runs)])
    if "--runc-bundle" in rest:
        bundle = rest[rest.index("--runc-bundle") + 1]
        report("runc run (prepared bundle)",
               [attached_once(["runc", "--root", f"/tmp/bench-runc-{os.getpid()}", "run",
                               "--bundle", bundle, f"bench-{os.getpid()}-{i}"])
                for i in range(runs)])
    if "--podman" in rest:
        attached_once(["podman", "run", "--rm", "--network", "host", "localhost/busybox:latest",
                       "echo", "ready"])
        report("podman run --rm", [attached_once(
            ["podman", "run", "--rm", "--network", "host", "localhost/busybox:latest", "echo",
             "ready"]) for _ in range(runs)])
    if "--docker" in rest:
        report("docker run --rm", [attached_once(
            ["docker", "run", "--rm", "--network", "host", "busybox:latest", "echo", "ready"])
            for _ in range(runs)])


if __name__ == "__main__":
    main()
