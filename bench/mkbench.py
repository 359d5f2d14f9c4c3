#!/usr/bin/env python3
"""Write the benchmark images as deterministic OCI layouts (reusing tests/rig/mkimages.py).

One job: the images the cluster benchmark pulls, at the sizes the issue names (~10 MB, ~200 MB,
~1 GB) with 1 and 4 layers, each with content of its own (no shared layers, so byte counts are
simple). Layers are uncompressed tars of incompressible bytes: no gzip time at generation, and
what crosses the wire is exactly the layer size. Pushing is bench/cluster.sh's job.

Usage: mkbench.py OUT_ROOT SPEC...
  SPEC is SIZE_MB:LAYERS, e.g. 10:1 200:4. Writes OUT_ROOT/<key>/<name>/ (one OCI layout per
  image, name "s<SIZE>l<LAYERS>") and OUT_ROOT/<key>/layouts.json, and prints that directory.
  Cached: the key is the generator version plus the specs, so a re-run costs nothing.
"""

import json
import os
import shutil
import sys

# No __pycache__ inside tests/rig: that directory is not ours.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "rig"))
import mkimages  # noqa: E402  (the rig's deterministic layout writer)

# Bump when what is generated changes: the cache is keyed by it.
VERSION = "b1"


def parse_spec(text):
    size, _, layers = text.partition(":")
    size_mb, n = int(size), int(layers or "1")
    if size_mb < 1 or not 1 <= n <= 16:
        raise ValueError(f"bad spec {text!r}: want SIZE_MB>=1 and 1..16 layers")
    return size_mb, n


def build(root, size_mb, layers):
    name = f"s{size_mb}l{layers}"
    layout = mkimages.Layout(os.path.join(root, name))
    total = size_mb << 20
    per = total // layers
    specs = []
    for i in range(layers):
        size = per if i < layers - 1 else total - per * (layers - 1)
        specs.append(([(f"opt/bench/{name}/part{i}.bin", size)], False))
    manifest, blobs = mkimages.build_manifest(layout, f"bench-{name}", "amd64", specs)
    layout.set_refs(manifest, ["v1"])
    return {
        "name": name,
        "repository": f"bench/{name}",
        "size_mb": size_mb,
        "layers": layers,
        "layout": os.path.join(root, name),
        "digest": manifest["digest"],
        "blobs": [{"digest": b["digest"], "size": b["size"]} for b in blobs],
        "bytes": sum(b["size"] for b in blobs),
    }


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        specs = [parse_spec(a) for a in argv[2:]]
    except ValueError as e:
        print(f"mkbench.py: {e}", file=sys.stderr)
        return 2
    key = VERSION + "-" + "-".join(f"{s}x{n}" for s, n in specs)
    out = os.path.join(argv[1], key)
    if not os.path.exists(os.path.join(out, "layouts.json")):
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        entries = [build(tmp, s, n) for s, n in specs]
        for e in entries:
            e["layout"] = os.path.join(out, e["name"])
        with open(os.path.join(tmp, "layouts.json"), "w") as f:
            json.dump({"version": VERSION, "images": entries}, f, indent=2, sort_keys=True)
            f.write("\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
