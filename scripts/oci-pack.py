#!/usr/bin/env python3
"""Pack a list of files into a reproducible OCI image layout.

One job: turn a file list (what goes where, with which mode and owner) and the image metadata
into an OCI image layout whose digest depends only on those inputs. Choosing the files is
scripts/image.sh's job; so is pushing.

Determinism: tar entries sorted by path, USTAR headers with fixed mtime (SOURCE_DATE_EPOCH),
numeric owners only (no user/group names), modes given explicitly (never the umask's), gzip with
mtime=0 and no file name, and JSON with sorted keys and no whitespace.

Usage: oci-pack.py SPEC OUT_DIR META_JSON
  SPEC       tab-separated lines: LAYER  TYPE  PATH  MODE  UID:GID  SOURCE
             LAYER names the layer (layers are written in order of first appearance); TYPE is
             f (regular file, content read from SOURCE), d (directory) or l (symlink to SOURCE).
             Parent directories not listed are added as 0755 0:0.
  OUT_DIR    the layout directory to create (must not exist)
  META_JSON  {"tag", "created", "epoch", "user", "env", "cmd", "labels", "history": {LAYER: text}}
Prints the manifest digest on stdout.
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_spec(path):
    """Returns {layer: {path: (type, mode, uid, gid, source)}} in order of first appearance."""
    layers = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 6:
                sys.exit(f"oci-pack: {path}:{n}: want 6 tab-separated fields, got {len(fields)}")
            layer, kind, name, mode, owner, source = fields
            if kind not in ("f", "d", "l") or not name.startswith("/") or name == "/":
                sys.exit(f"oci-pack: {path}:{n}: bad entry {kind!r} {name!r}")
            uid, gid = (int(x) for x in owner.split(":"))
            entries = layers.setdefault(layer, {})
            name = name.strip("/")
            if name in entries:
                sys.exit(f"oci-pack: {path}:{n}: {name} listed twice")
            entries[name] = (kind, int(mode, 8), uid, gid, source)
    for entries in layers.values():
        for name in list(entries):
            parent = os.path.dirname(name)
            while parent and parent not in entries:
                entries[parent] = ("d", 0o755, 0, 0, "")
                parent = os.path.dirname(parent)
    return layers


def layer_tar(entries, epoch):
    """The uncompressed tar of one layer: entries sorted by path, every header field fixed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(entries):
            kind, mode, uid, gid, source = entries[name]
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, epoch
            info.uname = info.gname = ""
            data = None
            if kind == "d":
                info.type = tarfile.DIRTYPE
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, source
            else:
                with open(source, "rb") as f:
                    data = f.read()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_blob(out, data):
    digest = sha256(data)
    with open(os.path.join(out, "blobs", "sha256", digest.split(":", 1)[1]), "wb") as f:
        f.write(data)
    return digest


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    spec, out, meta = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    layers = read_spec(spec)
    os.makedirs(os.path.join(out, "blobs", "sha256"))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))

    descriptors, diff_ids, history = [], [], []
    for layer, entries in layers.items():
        tar = layer_tar(entries, meta["epoch"])
        gz = gzip.compress(tar, compresslevel=9, mtime=0)
        descriptors.append({"mediaType": MT_LAYER, "digest": write_blob(out, gz), "size": len(gz)})
        diff_ids.append(sha256(tar))
        history.append({"created": meta["created"], "created_by": meta["history"][layer]})

    config = {
        "created": meta["created"],
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": meta["user"],
            "Env": meta["env"],
            "Cmd": meta["cmd"],
            "WorkingDir": "/",
            "Labels": meta["labels"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    config_bytes = canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {
            "mediaType": MT_CONFIG,
            "digest": write_blob(out, config_bytes),
            "size": len(config_bytes),
        },
        "layers": descriptors,
        "annotations": meta["labels"],
    }
    manifest_bytes = canonical_json(manifest)
    digest = write_blob(out, manifest_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {REF_NAME: meta["tag"]},
            }
        ],
    }
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(canonical_json(index))
    print(digest)


if __name__ == "__main__":
    main()
