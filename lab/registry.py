"""The lab's container registry: Debian's docker-registry on the host side of the lab bridge,
and a small client that pushes lab/images.py's images into it over the registry HTTP API.

Each lab Pi's dockerd pulls from it as a real Pi would pull from a registry on the LAN:
started with `--insecure-registry ADDRESS` (plain HTTP on a private address) and
`--registry-mirror http://ADDRESS`, so the seed's Docker Hub names (`postgres:15-alpine`)
resolve to the lab's stand-ins without any traffic leaving the machine.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from picoord.lab.images import MANIFEST_LIST_TYPE, MANIFEST_TYPE, Blob, Image, ImageList
from picoord.lab.netns import LabError

HTTP_TIMEOUT = 30.0
START_TIMEOUT = 20.0


def registry_config(root: Path, address: str) -> str:
    """docker-registry's YAML: filesystem storage under `root`, HTTP on `address`."""
    return (
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {address}\n"
    )


def dockerd_registry_args(address: str, mirror: str | None = None) -> list[str]:
    """What a lab Pi's dockerd needs to pull from the lab registry at `address` (HOST:PORT);
    Docker Hub names go to `mirror` (another lab registry, HOST:PORT) if given, else to it."""
    args = ["--insecure-registry", address]
    if mirror and mirror != address:
        args += ["--insecure-registry", mirror]
    return [*args, "--registry-mirror", f"http://{mirror or address}"]


def _request(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT, context=context)


@dataclass
class Registry:
    """A docker-registry process serving `address` (HOST:PORT) from `root`."""

    root: Path
    address: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # HTTPS verified by this CA (the cluster registry a Registry document set up), else HTTP
    ca_pem: str = field(default="", repr=False)

    @property
    def url(self) -> str:
        return f"https://{self.address}" if self.ca_pem else f"http://{self.address}"

    def _open(self, method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None):
        context = ssl.create_default_context(cadata=self.ca_pem) if self.ca_pem else None
        return _request(method, url, data, headers, context)

    def argv(self) -> list[str]:
        """The command that serves this registry, its config file written first."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root.parent / f"{self.root.name}.yml"
        config.write_text(registry_config(self.root, self.address))
        return ["docker-registry", "serve", str(config)]

    def start(self) -> Registry:
        """Start it as a child of this process (tests); the lab spawns `argv()` itself."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LabError(f"docker-registry on {self.address} did not answer; see {self.log_path}")
            time.sleep(0.1)
        return self

    def answers(self) -> bool:
        try:
            with self._open("GET", f"{self.url}/v2/") as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # pushing
    def has_blob(self, repository: str, blob: Blob) -> bool:
        try:
            with self._open("HEAD", f"{self.url}/v2/{repository}/blobs/{blob.digest}") as reply:
                return reply.status == 200
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return False
            raise

    def push_blob(self, repository: str, blob: Blob) -> None:
        if self.has_blob(repository, blob):
            return
        with self._open("POST", f"{self.url}/v2/{repository}/blobs/uploads/", b"") as reply:
            location = reply.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(blob.data))}
        with self._open("PUT", f"{location}{separator}digest={blob.digest}", blob.data, headers) as reply:
            if reply.status != 201:
                raise LabError(f"registry refused blob {blob.digest} for {repository}: HTTP {reply.status}")

    def push(self, image: Image, reference: str | None = None) -> str:
        """Upload the image's blobs and manifest, under its tag or `reference` (a digest);
        return the manifest's digest."""
        for blob in (*image.layers, image.config):
            self.push_blob(image.repository, blob)
        return self._put_manifest(image.repository, reference or image.tag, image.manifest, MANIFEST_TYPE)

    def push_list(self, image_list: ImageList) -> str:
        """Upload every image of the list by digest, then the manifest list under its tag."""
        for image in image_list.images:
            if image.repository != image_list.repository:
                raise LabError(f"{image.reference} cannot be part of the list {image_list.reference}")
            self.push(image, image.manifest_digest)
        manifest = image_list.manifest
        return self._put_manifest(image_list.repository, image_list.tag, manifest, MANIFEST_LIST_TYPE)

    def _put_manifest(self, repository: str, reference: str, manifest: bytes, media_type: str) -> str:
        url = f"{self.url}/v2/{repository}/manifests/{reference}"
        with self._open("PUT", url, manifest, {"Content-Type": media_type}) as reply:
            if reply.status != 201:
                raise LabError(f"registry refused the manifest {repository}:{reference}: HTTP {reply.status}")
            return reply.headers.get("Docker-Content-Digest", "")

    def tags(self, repository: str) -> list[str]:
        with contextlib.closing(self._open("GET", f"{self.url}/v2/{repository}/tags/list")) as reply:
            return list(json.loads(reply.read()).get("tags") or [])
