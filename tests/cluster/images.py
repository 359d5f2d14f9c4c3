#!/usr/bin/env python3
"""Write the cluster tier's images as deterministic OCI image layouts.

One job: turn the few files the cluster's pods run (a static pause binary, a static kubectl,
busybox-static, optionally the speculum binaries) plus seeded filler layers into OCI layouts
whose digests only depend on those inputs, and describe them as JSON on stdout. Pushing them
is cluster.sh's job. Shares its deterministic tar/gzip/JSON writers with tests/rig/mkimages.py.

Usage: images.py OUT --pause FILE --kubectl FILE --busybox FILE --upstream HOST:PORT
                     --private HOST:PORT [--speculum-bin FILE --webhook-bin FILE]
  Writes OUT/<cache key>/<image>/ and OUT/pause.tar (the pause image as an OCI archive for
  `ctr images import`, named for the upstream registry). The cache key hashes every input, so
  a re-run with the same inputs costs nothing.
Environment:
  CLUSTER_BIG_MB   size of each big image's incompressible layer in MiB (default 200)
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "rig"))
import mkimages  # noqa: E402  (the rig's deterministic writers)
from mkimages import (  # noqa: E402
    CREATED, EPOCH, MT_CONFIG, MT_LAYER_GZIP, MT_LAYER_TAR, MT_MANIFEST, REF_NAME,
    HashingWriter, Layout, canonical_json,
)

# Bump when anything below changes what is generated.
VERSION = "c1"
IMAGE_NAME = "io.containerd.image.name"


class Tree:
    """The files of one layer: (path in the image, kind, mode, source) sorted by path."""

    def __init__(self):
        self.entries = {}

    def file(self, path, mode, source):
        """source: a host file path, bytes, or ("seeded", seed, size)."""
        self._parents(path)
        self.entries[path] = ("file", mode, source)

    def symlink(self, path, target):
        self._parents(path)
        self.entries[path] = ("symlink", 0o777, target)

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", 0o755, None))


def write_tree(out, tree):
    """A USTAR archive of `tree` with fixed headers (uid/gid 0, mtime EPOCH)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(tree.entries):
            kind, mode, source = tree.entries[path]
            info = tarfile.TarInfo(path + ("/" if kind == "dir" else ""))
            info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = mode, EPOCH, 0, 0, "", ""
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, source
                tar.addfile(info)
            elif isinstance(source, tuple):
                _, seed, size = source
                info.size = size
                tar.addfile(info, mkimages.ChunkReader(mkimages.seeded_bytes(seed, size)))
            elif isinstance(source, bytes):
                info.size = len(source)
                tar.addfile(info, io.BytesIO(source))
            else:
                info.size = os.path.getsize(source)
                with open(source, "rb") as f:
                    tar.addfile(info, f)


def put_tree(layout, tree, compress):
    """Writes one layer blob; returns (descriptor, diff_id)."""
    fd, tmp = tempfile.mkstemp(dir=layout.blobs, prefix=".tmp-")
    with os.fdopen(fd, "wb") as raw:
        outer = HashingWriter(raw)
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0) if compress else None
        inner = HashingWriter(gz) if gz else outer
        write_tree(inner, tree)
        if gz:
            gz.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, layout._blob_path(outer.digest()))
    media = MT_LAYER_GZIP if compress else MT_LAYER_TAR
    return {"mediaType": media, "digest": outer.digest(), "size": outer.size}, inner.digest()


def build_image(root, name, tags, layers, config):
    """One single-platform image; tags: {tag: [(tree, compress)...]}, each tag its own manifest
    (a tag that "moves" is two manifests in one layout). Returns per-tag entries."""
    layout = Layout(os.path.join(root, name))
    refs, out = [], {}
    for tag, tag_layers in tags.items():
        descs, diff_ids = [], []
        for tree, compress in layers + tag_layers:
            d, diff = put_tree(layout, tree, compress)
            descs.append(d)
            diff_ids.append(diff)
        cfg = {
            "architecture": "amd64", "os": "linux", "created": CREATED,
            "config": dict(config, Labels={"org.opencontainers.image.title": f"{name}:{tag}"}),
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": CREATED, "created_by": f"images.py {VERSION}"} for _ in descs],
        }
        cfg_desc = layout.put(canonical_json(cfg), MT_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": cfg_desc, "layers": descs}
        m_desc = layout.put(canonical_json(manifest), MT_MANIFEST)
        refs.append(dict(m_desc, annotations={REF_NAME: tag}))
        blobs = [m_desc, cfg_desc] + descs
        out[tag] = {
            "digest": m_desc["digest"],
            "blobs": [{"digest": b["digest"], "size": b["size"], "media_type": b["mediaType"]} for b in blobs],
            "layers": [{"digest": b["digest"], "size": b["size"]} for b in descs],
            "bytes": sum(b["size"] for b in blobs),
        }
    with open(os.path.join(layout.path, "index.json"), "wb") as f:
        f.write(canonical_json({"schemaVersion": 2, "manifests": refs}))
    return layout.path, out


def libs_of(binary):
    """The shared libraries `binary` loads (ldd), with the dynamic loader."""
    try:
        text = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError:
        return []  # static
    libs = []
    for line in text.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def speculum_dev_tree(speculum, webhook):
    """A stand-in speculum image from local binaries (the release image is scripts/image.sh's)."""
    t = Tree()
    t.file("usr/local/bin/speculum", 0o755, speculum)
    t.file("usr/local/bin/speculum-webhook", 0o755, webhook)
    for lib in sorted(set(libs_of(speculum) + libs_of(webhook))):
        t.file(lib.lstrip("/"), 0o755, os.path.realpath(lib))
    t.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n")
    t.file("etc/group", 0o644, b"root:x:0:\nnonroot:x:65532:\n")
    t.file("etc/ssl/certs/ca-certificates.crt", 0o644, b"")
    t.file("tmp/.keep", 0o644, b"")
    return t


def inputs_key(args):
    h = hashlib.sha256(VERSION.encode())
    h.update(os.environ.get("CLUSTER_BIG_MB", "200").encode())
    h.update(args.upstream.encode() + args.private.encode())
    for p in (args.pause, args.kubectl, args.busybox, args.speculum_bin, args.webhook_bin):
        if p:
            st = os.stat(p)
            h.update(f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    for a in ("--pause", "--kubectl", "--busybox", "--upstream", "--private"):
        ap.add_argument(a, required=True)
    ap.add_argument("--speculum-bin")
    ap.add_argument("--webhook-bin")
    args = ap.parse_args()
    big_mb = int(os.environ.get("CLUSTER_BIG_MB", "200"))
    key = inputs_key(args)
    out = os.path.join(args.out, key)
    done = os.path.join(out, "images.json")
    if os.path.exists(done):
        sys.stdout.write(open(done).read())
        return 0
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    pause = Tree()
    pause.file("pause", 0o755, args.pause)
    kubectl = Tree()
    kubectl.file("usr/local/bin/kubectl", 0o755, args.kubectl)
    base = Tree()
    base.file("bin/busybox", 0o755, args.busybox)
    for tool in ("sh", "sleep", "cat", "ls", "wget", "true"):
        base.symlink(f"bin/{tool}", "busybox")

    def seeded(name, size):
        t = Tree()
        t.file(f"opt/{name}/data.bin", 0o644, ("seeded", f"cluster/{VERSION}/{name}", size))
        return t

    app = {"Cmd": ["/bin/busybox", "sleep", "86400"], "Env": ["PATH=/bin"]}
    images = []

    def add(name, registry, repo, tags, layers, config):
        path, per_tag = build_image(tmp, name, tags, layers, config)
        host = args.upstream if registry == "upstream" else args.private
        for tag, e in per_tag.items():
            images.append(dict(e, name=f"{name}:{tag}", registry=registry, layout=path.replace(tmp, out),
                               tag=tag, ref=f"{repo}:{tag}", full=f"{host}/{repo}:{tag}",
                               by_digest=f"{host}/{repo}@{e['digest']}"))

    add("pause", "upstream", "cluster/pause", {"3.10": []}, [(pause, True)], {"Entrypoint": ["/pause"]})
    add("kubectl", "upstream", "cluster/kubectl", {"v1.33.13": []}, [(kubectl, True)],
        {"Entrypoint": ["/usr/local/bin/kubectl"], "Env": ["HOME=/tmp"]})
    # Two big images (b: spread over the nodes; g: streamed while its source pod is deleted),
    # each base + an incompressible layer, uncompressed so generating it costs no gzip time.
    for big in ("big", "big2"):
        add(big, "upstream", f"cluster/{big}", {"v1": []}, [(base, True), (seeded(big, big_mb << 20), False)], app)
    # A tag that moves (c): two manifests, pushed under one tag one after the other.
    add("web", "upstream", "cluster/web", {"v1": [(seeded("web-v1", 64 << 10), True)],
                                           "v2": [(seeded("web-v2", 64 << 10), True)]}, [(base, True)], app)
    for small in ("roll", "after"):
        add(small, "upstream", f"cluster/{small}", {"v1": []}, [(base, True), (seeded(small, 1 << 20), False)], app)
    # The tenancy scenario's private image (d), in the htpasswd registry.
    add("secret", "private", "team-a/secret", {"v1": []}, [(base, True), (seeded("secret", 16 << 20), False)], app)
    if args.speculum_bin and args.webhook_bin:
        add("speculum", "upstream", "speculum/speculum", {"dev": []},
            [(speculum_dev_tree(args.speculum_bin, args.webhook_bin), True)],
            {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "User": "0"})

    # The pause image as an OCI archive for `ctr images import`, named for the upstream.
    pause_entry = next(i for i in images if i["name"] == "pause:3.10")
    with tarfile.open(os.path.join(tmp, "pause.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        layout = os.path.join(tmp, "pause")
        for root, _, files in sorted(os.walk(layout)):
            for f in sorted(files):
                p = os.path.join(root, f)
                rel = os.path.relpath(p, layout)
                if rel == "index.json":
                    idx = json.load(open(p))
                    for m in idx["manifests"]:
                        m["annotations"][IMAGE_NAME] = pause_entry["full"]
                    data = canonical_json(idx)
                    info = tarfile.TarInfo(rel)
                    info.size, info.mtime = len(data), EPOCH
                    tar.addfile(info, io.BytesIO(data))
                else:
                    info = tar.gettarinfo(p, rel)
                    info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
                    with open(p, "rb") as fh:
                        tar.addfile(info, fh)

    doc = {"version": VERSION, "key": key, "pause_tar": os.path.join(out, "pause.tar"), "images": images}
    with open(os.path.join(tmp, "images.json"), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    sys.stdout.write(open(done).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
