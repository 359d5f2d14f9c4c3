#!/usr/bin/env python3
"""HEAD latency of registries, interleaved, on kept-alive connections (stdlib only).

One job: time the request containerd sends first — `HEAD /v2/<repo>/manifests/<tag>` with the
manifest Accept list — against candidates and a reference server (the last one) in the same
run. Blocks of requests alternate between them so machine noise (other builds on the same
cores) hits all alike. The client's own cost (~tens of µs in Python) is in every number, so
ratios lean toward 1; the absolute p50/p99 are upper bounds.

Usage: latency.py COUNT NAME=URL NAME=URL [NAME=URL...]   (prints one JSON object)
A non-200 answer (a mirror that found no peer in time) is counted in `misses`, not timed.
URLs on loopback only, or, run inside a rig namespace (`ip netns exec`), on the rig's subnet
when LATENCY_SUBNET names its prefix (e.g. 10.250.94.). With two targets the output keeps its
old shape (`ratio_p50`/`ratio_p99`: first / second); with more, `ratio_p50_<name>` and
`ratio_p99_<name>` for every target against the last.
"""

import http.client
import json
import os
import sys
import time
import urllib.parse

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
BLOCK = 50
WARMUP = 50
MAX_MISSES = 1000


class Target:
    def __init__(self, name, url):
        u = urllib.parse.urlsplit(url)
        subnet = os.environ.get("LATENCY_SUBNET", "")
        loopback = u.hostname in ("127.0.0.1", "localhost", "::1")
        if not loopback and not (subnet and u.hostname.startswith(subnet)):
            raise SystemExit(f"latency.py: {url}: loopback (or LATENCY_SUBNET) only")
        self.name = name
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path + ("?" + u.query if u.query else "")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        self.samples = []
        self.misses = 0

    def once(self):
        t0 = time.perf_counter_ns()
        self.conn.request("HEAD", self.path, headers={"Accept": ACCEPT})
        r = self.conn.getresponse()
        r.read()
        dt = time.perf_counter_ns() - t0
        if r.status != 200 or not r.getheader("Docker-Content-Digest"):
            # A mirror that found no peer in time answers 404 (containerd would go upstream):
            # counted, not timed. Only when misses are all there is does the run fail.
            self.misses += 1
            if self.misses > MAX_MISSES:
                raise SystemExit(f"latency.py: {self.name}: status {r.status}, "
                                 f"digest {r.getheader('Docker-Content-Digest')!r}")
            return None
        return dt


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round((len(v) - 1) * p)))]


def main(argv):
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    count = int(argv[1])
    targets = [Target(*a.split("=", 1)) for a in argv[2:]]
    for t in targets:
        for _ in range(WARMUP):
            t.once()
        t.misses = 0
    deadline = time.monotonic() + 120  # bounded whatever COUNT says
    while len(targets[0].samples) < count and time.monotonic() < deadline:
        for t in targets:
            t.samples.extend(d for d in (t.once() for _ in range(BLOCK)) if d is not None)
    out = {}
    for t in targets:
        out[t.name] = {"n": len(t.samples), "misses": t.misses,
                       "p50_us": pct(t.samples, 0.5) / 1000,
                       "p99_us": pct(t.samples, 0.99) / 1000}
    if len(targets) == 2:
        a, b = targets
        out["ratio_p50"] = round(out[a.name]["p50_us"] / out[b.name]["p50_us"], 3)
        out["ratio_p99"] = round(out[a.name]["p99_us"] / out[b.name]["p99_us"], 3)
    else:
        ref = targets[-1]
        for t in targets[:-1]:
            for p in ("p50", "p99"):
                out[f"ratio_{p}_{t.name}"] = round(
                    out[t.name][f"{p}_us"] / out[ref.name][f"{p}_us"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
