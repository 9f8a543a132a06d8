"""the VMM's guest images from a registry: ListRegistryImages, PullRegistryImage, DeleteImage.

`[image] registry` names a repository of OS images (`[http://]host[:port]/repo`); its tags are
listed (except `sha256-*` signature tags), a tag is pulled in the background into
`<image path>/dstack-<tag>` (`<tag>` when it already starts with `dstack-`), and an image
directory no VM uses can be deleted. Pull progress and the last error per tag are kept in
memory and shown by ListRegistryImages.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pydstack.errors import DstackError
from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from .registry import RegistryClient, RegistryError, Repository, validate_tag

log = logging.getLogger("dstack-vmm")

#: an image directory name: one path component, no leading dot
IMAGE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class ImageStoreError(DstackError):
    """an image cannot be listed, pulled or deleted; the message says why."""


def image_dir_name(tag: str) -> str:
    """upstream's local name of a registry tag: `dstack-<tag>` unless it starts so already."""
    return tag if tag.startswith("dstack-") else f"dstack-{tag}"


class ImageStore:
    """`image_path` with pulls from `registry` ("" when none is configured); `in_use` gives
    the image names VMs refer to (they cannot be deleted)."""

    def __init__(
        self,
        image_path: Path,
        registry: str,
        in_use: Callable[[], set[str]],
        builtin: frozenset[str] = frozenset(),
    ) -> None:
        self.image_path = image_path
        self.builtin = builtin
        self.registry = registry
        self.in_use = in_use
        self.pulling: dict[str, asyncio.Task[None]] = {}
        self.errors: dict[str, str] = {}
        for stale in image_path.glob(".pull-*"):  # a pull the vmm died in
            shutil.rmtree(stale, ignore_errors=True)

    def _repo(self) -> Repository:
        if not self.registry:
            raise ImageStoreError("no image registry is configured ([image] registry)")
        try:
            return Repository.parse(self.registry)
        except ValueError as e:
            raise ImageStoreError(f"[image] registry: {e}") from e

    async def list(self) -> pb.RegistryImageListResponse:
        out = pb.RegistryImageListResponse()
        if not self.registry:
            return out
        async with RegistryClient(self._repo(), timeout=30) as client:
            try:
                tags = await client.list_tags()
            except RegistryError as e:
                raise ImageStoreError(f"cannot list the registry's images: {e}") from e
        for tag in sorted(set(tags)):
            if tag.startswith("sha256-"):
                continue
            out.images.append(
                pb.RegistryImageInfo(
                    tag=tag,
                    local=(self.image_path / image_dir_name(tag)).is_dir(),
                    pulling=tag in self.pulling,
                    error=self.errors.get(tag, ""),
                )
            )
        return out

    def pull(self, tag: str) -> None:
        """start pulling `tag`; ImageStoreError for a bad tag, no registry, a pull of it already
        running or an image directory of that name already present."""
        try:
            validate_tag(tag)
        except ValueError as e:
            raise ImageStoreError(str(e)) from e
        repo = self._repo()
        if tag in self.pulling:
            raise ImageStoreError(f"image {tag} is already being pulled")
        dest = self.image_path / image_dir_name(tag)
        if dest.exists():
            raise ImageStoreError(f"image {dest.name} already exists")
        self.errors.pop(tag, None)
        self.pulling[tag] = asyncio.create_task(self._pull(repo, tag, dest))

    async def _pull(self, repo: Repository, tag: str, dest: Path) -> None:
        log.info("pulling image %s:%s into %s", repo, tag, dest)
        try:
            async with RegistryClient(repo) as client:
                await client.pull(tag, dest)
            log.info("pulled image %s:%s", repo, tag)
        except (RegistryError, OSError) as e:
            self.errors[tag] = str(e)
            log.error("pull of image %s:%s failed: %s", repo, tag, e)
        finally:
            self.pulling.pop(tag, None)

    async def wait(self, tag: str) -> None:
        """until the pull of `tag` (if any) has ended."""
        task = self.pulling.get(tag)
        if task is not None:
            await asyncio.shield(task)

    def delete(self, name: str) -> None:
        """remove the image directory `name`; ImageStoreError (nothing removed) for a name that
        is not one directory entry, the built-in image, an image a VM uses or one being pulled,
        and a missing directory."""
        if not IMAGE_NAME_RE.fullmatch(name) or ".." in name:
            raise ImageStoreError(f"invalid image name {name[:80]!r}")
        if name in self.builtin:
            raise ImageStoreError(f"{name} is a built-in image and cannot be deleted")
        if name in self.in_use():
            raise ImageStoreError(f"image {name} is in use by a vm")
        if any(image_dir_name(t) == name for t in self.pulling):
            raise ImageStoreError(f"image {name} is being pulled")
        path = self.image_path / name
        if path.is_symlink() or not path.is_dir():
            raise ImageStoreError(f"image {name} not found")
        shutil.rmtree(path)
        log.info("deleted image %s", name)

    async def close(self) -> None:
        for task in list(self.pulling.values()):
            task.cancel()
