#!/usr/bin/env python3
"""Write the rig's test images as deterministic OCI image layouts.

One job: turn a fixed description of test images into OCI layouts whose digests are identical on
every run and every machine of this kind, so tests can assert on digests. Pushing them is
push-images.sh's job.

Determinism comes from: fixed tar headers (mtime, uid/gid, names, mode, USTAR format), content
from SHAKE-256 of a fixed seed (portable, unlike an implementation's PRNG), gzip with mtime=0 and
no file name, and JSON with sorted keys and no whitespace.

Usage: mkimages.py OUT_ROOT
  Writes OUT_ROOT/<cache key>/<image>/ (one OCI layout per image) and
  OUT_ROOT/<cache key>/layouts.json, and prints the <cache key> directory on stdout. The cache
  key is VERSION plus the big layer size, so a re-run with the same inputs costs nothing.
Environment:
  RIG_BIG_MB   size of the big image's incompressible layer in MiB (default 200)
"""

import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile

# Bump when anything below changes what is generated: the cache is keyed by it.
VERSION = "v3"

# 2000-01-01T00:00:00Z: a fixed, obviously synthetic timestamp for tar headers and configs.
EPOCH = 946684800
CREATED = "2000-01-01T00:00:00Z"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

CHUNK = 1 << 20


def canonical_json(obj):
    """Bytes of obj as JSON with sorted keys and no whitespace: same object, same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def seeded_bytes(seed, size):
    """Yields `size` incompressible bytes derived only from `seed`, in chunks of at most 1 MiB."""
    index = 0
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield hashlib.shake_256(f"{seed}/{index}".encode()).digest(n)
        index += 1
        left -= n


class ChunkReader:
    """A file-like reader over a generator of byte chunks (tarfile copies from `read`)."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._buf = b""

    def read(self, n=-1):
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class HashingWriter:
    """Writes to a file while hashing; tarfile and gzip only need write/tell/flush."""

    def __init__(self, f):
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, b):
        self._f.write(b)
        self._h.update(b)
        self.size += len(b)
        return len(b)

    def tell(self):
        return self.size

    def flush(self):
        self._f.flush()

    def digest(self):
        return "sha256:" + self._h.hexdigest()


class Layout:
    """One OCI image layout directory being written (spec: image-layout.md)."""

    def __init__(self, path):
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def put(self, data, media_type):
        """Stores bytes as a blob and returns its descriptor."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(self._blob_path(digest), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def put_layer(self, seed, files, compress):
        """Writes a layer tar of `files` [(name, size)] and returns (descriptor, diff_id).

        Streams through a temporary file so a 200 MiB layer never sits in memory.
        """
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        with os.fdopen(fd, "wb") as raw:
            outer = HashingWriter(raw)
            gz = gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0) if compress else None
            inner = HashingWriter(gz) if gz else outer
            write_tar(inner, seed, files)
            if gz:
                gz.close()
        diff_id = inner.digest()
        digest = outer.digest()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; blobs are plain readable files
        os.replace(tmp, self._blob_path(digest))
        media_type = MT_LAYER_GZIP if compress else MT_LAYER_TAR
        return {"mediaType": media_type, "digest": digest, "size": outer.size}, diff_id

    def set_refs(self, descriptor, tags):
        """Writes index.json naming `descriptor` once per tag (skopeo's `oci:DIR:TAG`)."""
        manifests = [dict(descriptor, annotations={REF_NAME: t}) for t in tags]
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(canonical_json({"schemaVersion": 2, "manifests": manifests}))

    def _blob_path(self, digest):
        return os.path.join(self.blobs, digest.split(":", 1)[1])


def write_tar(out, seed, files):
    """Writes a USTAR archive with fixed headers; each file's content comes from its seed."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({os.path.dirname(name) for name, _ in files} - {""})
        for d in dirs:
            tar.addfile(tar_info(d + "/", tarfile.DIRTYPE, 0o755, 0))
        for name, size in files:
            info = tar_info(name, tarfile.REGTYPE, 0o644, size)
            tar.addfile(info, ChunkReader(seeded_bytes(f"{seed}/{name}", size)))


def tar_info(name, kind, mode, size):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_manifest(layout, name, arch, layers):
    """Writes config and layers for one platform; returns (manifest descriptor, blob list).

    `layers` is [(files, compress)]; the blob list is the platform's closure: manifest, config,
    layers, with sizes, in the order a client fetches them.
    """
    layer_descs, diff_ids = [], []
    for i, (files, compress) in enumerate(layers):
        desc, diff_id = layout.put_layer(f"{name}/{arch}/layer{i}", files, compress)
        layer_descs.append(desc)
        diff_ids.append(diff_id)
    config = {
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": {"Env": [f"SPECULUM_RIG_IMAGE={name}"], "Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": f"mkimages.py {VERSION} layer {i}"}
                    for i in range(len(layers))],
    }
    config_desc = layout.put(canonical_json(config), MT_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    manifest_desc = layout.put(canonical_json(manifest), MT_MANIFEST)
    return manifest_desc, [manifest_desc, config_desc] + layer_descs


def small_layers(name, kib):
    """Two small gzip layers: a text-ish file and a seeded binary file."""
    return [
        ([(f"etc/speculum-rig/{name}.conf", 512)], True),
        ([(f"opt/{name}/data.bin", kib * 1024)], True),
    ]


def plain_layers(name, kib):
    """small_layers, uncompressed: skopeo compresses them on push (zstd images)."""
    return [(files, False) for files, _ in small_layers(name, kib)]


# What the rig offers. Each entry: name (also the repository rig/<name>), tags, how it is pushed
# (oci: digests preserved; v2s2: converted by skopeo; zstd, zstd:chunked: layers compressed by
# skopeo --dest-compress-format), and which layers each platform has.
def image_specs(big_mb):
    return [
        # (a) a small OCI image: config + 2 layers.
        {"name": "small", "tags": ["v1"], "format": "oci",
         "platforms": {"amd64": small_layers("small", 64)}},
        # (b) the same kind as a docker v2s2 image (skopeo copy --format v2s2).
        {"name": "docker", "tags": ["v1"], "format": "v2s2",
         "platforms": {"amd64": small_layers("docker", 64)}},
        # (c) a multi-arch index; pulls on this amd64 machine use the amd64 manifest.
        {"name": "multi", "tags": ["v1"], "format": "oci",
         "platforms": {"amd64": small_layers("multi-amd64", 32),
                       "arm64": small_layers("multi-arm64", 32)}},
        # (d) a big layer of incompressible data, uncompressed so generation costs no gzip time.
        {"name": "big", "tags": ["v1"], "format": "oci",
         "platforms": {"amd64": [([("opt/big/blob.bin", big_mb << 20)], False),
                                 ([("etc/speculum-rig/big.conf", 512)], True)]}},
        # (e) one manifest under two tags.
        {"name": "tags", "tags": ["v1", "latest"], "format": "oci",
         "platforms": {"amd64": small_layers("tags", 16)}},
        # (f) never pulled by node 1: the "nobody has it, go upstream" case.
        {"name": "late", "tags": ["v1"], "format": "oci",
         "platforms": {"amd64": small_layers("late", 16)}},
        # (g) zstd and zstd:chunked layers. Their content is their own and uncompressed in the
        # layout, so skopeo really compresses it (skopeo 1.9 reuses a known gzip blob of the
        # same tar instead of recompressing one).
        # Pushed only when named (on_demand): containerd 1.6 cannot unpack skopeo 1.9's
        # zstd:chunked layers ("wrong diff id calculated on extraction"), so a test fetches
        # that one without unpacking.
        {"name": "zstd", "tags": ["v1"], "format": "zstd", "on_demand": True,
         "platforms": {"amd64": plain_layers("zstd", 64)}},
        {"name": "chunked", "tags": ["v1"], "format": "zstd:chunked", "on_demand": True,
         "platforms": {"amd64": plain_layers("chunked", 64)}},
    ]


def build_image(root, spec):
    """Writes one image's layout; returns its entry for layouts.json."""
    path = os.path.join(root, spec["name"])
    layout = Layout(path)
    per_platform = {}
    for arch, layers in spec["platforms"].items():
        per_platform[arch] = build_manifest(layout, spec["name"], arch, layers)
    if len(per_platform) == 1:
        (top, blobs), = per_platform.values()
        platform_digest = top["digest"]
    else:
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [dict(desc, platform={"architecture": arch, "os": "linux"})
                          for arch, (desc, _) in sorted(per_platform.items())],
        }
        top = layout.put(canonical_json(index), MT_INDEX)
        platform_digest, blobs = per_platform["amd64"][0]["digest"], per_platform["amd64"][1]
        blobs = [top] + blobs
    layout.set_refs(top, spec["tags"])
    return {
        "name": spec["name"],
        "repository": f"rig/{spec['name']}",
        "tags": spec["tags"],
        "format": spec["format"],
        "on_demand": spec.get("on_demand", False),
        "layout": path,
        # Known in advance only when skopeo preserves digests; push-images.sh records the rest.
        "digest": top["digest"] if spec["format"] == "oci" else None,
        "media_type": top["mediaType"],
        "platform_digest": platform_digest if spec["format"] == "oci" else None,
        # The amd64 closure: what a pull on this machine fetches (index, manifest, config, layers).
        "blobs": [{"digest": b["digest"], "size": b["size"], "media_type": b["mediaType"]}
                  for b in blobs],
        "bytes": sum(b["size"] for b in blobs),
    }


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        big_mb = int(os.environ.get("RIG_BIG_MB", "200"))
    except ValueError:
        print("mkimages.py: RIG_BIG_MB must be an integer", file=sys.stderr)
        return 2
    if big_mb < 1:
        print("mkimages.py: RIG_BIG_MB must be at least 1", file=sys.stderr)
        return 2
    out = os.path.join(argv[1], f"{VERSION}-big{big_mb}")
    done = os.path.join(out, "layouts.json")
    if not os.path.exists(done):
        # Build beside the final place and rename, so a crash never leaves a half cache entry.
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        entries = [build_image(tmp, spec) for spec in image_specs(big_mb)]
        for e in entries:
            e["layout"] = os.path.join(out, e["name"])
        with open(os.path.join(tmp, "layouts.json"), "w") as f:
            json.dump({"version": VERSION, "big_mb": big_mb, "images": entries}, f,
                      indent=2, sort_keys=True)
            f.write("\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
