"""`dstack image push | registry | pull | rm`: guest OS images and the VMM's image registry.

`push DIR REF` publishes an image directory (`metadata.json`, `digest.txt`, ...) to a registry
as an OCI image of one tar layer, straight over the registry v2 API (no VMM involved; `REF` is
`[http://]host[:port]/repo:tag`). `registry` lists the tags of the VMM's `[image] registry`,
`pull TAG` makes the VMM fetch one into its image directory (`dstack-TAG`), `rm NAME` deletes
an image directory no VM uses. `build --flavour dev|prod --out DIR` builds a guest image for the
qemu backend from Debian packages (local; see :mod:`pydstack.vmm.backends.qemu.image_build`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from ..registry import ImageRefError, RegistryClient, RegistryError, parse_reference
from .common import CliError, VmmClient
from .output import print_json, table


def cmd_push(c: VmmClient | None, a: argparse.Namespace) -> None:
    src = Path(a.dir)
    if not (src / "metadata.json").is_file():
        raise CliError(f"{src} is not an image directory (no metadata.json)")
    try:
        repo, tag = parse_reference(a.ref)
    except ImageRefError as e:
        raise CliError(str(e)) from e

    async def push() -> str:
        async with RegistryClient(repo) as client:
            return await client.push_dir(src, tag)

    try:
        digest = asyncio.run(push())
    except RegistryError as e:
        raise CliError(str(e)) from e
    print(f"pushed {src} as {repo}:{tag} ({digest})")


def cmd_registry(c: VmmClient, a: argparse.Namespace) -> None:
    images = c.call("ListRegistryImages", Empty(), pb.RegistryImageListResponse).images
    if a.json:
        print_json(images)
        return
    rows = [
        [i.tag, "yes" if i.local else "", "yes" if i.pulling else "", i.error[:60]] for i in images
    ]
    print(table(["Tag", "Local", "Pulling", "Error"], rows))


def cmd_pull(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("PullRegistryImage", pb.PullRegistryImageRequest(tag=a.tag), Empty)
    if not a.wait:
        print(f"pulling {a.tag} (see `dstack image registry`)")
        return
    while True:
        images = c.call("ListRegistryImages", Empty(), pb.RegistryImageListResponse).images
        info = next((i for i in images if i.tag == a.tag), None)
        if info is None or not info.pulling:
            break
        time.sleep(0.5)
    if info is not None and info.error:
        raise CliError(f"pull of {a.tag} failed: {info.error}")
    if info is None or not info.local:
        raise CliError(f"pull of {a.tag} did not produce an image")
    print(f"pulled {a.tag}")


def cmd_rm(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("DeleteImage", pb.Id(id=a.name), Empty)
    print(f"deleted image {a.name}")


def cmd_build(c: VmmClient | None, a: argparse.Namespace) -> None:
    from ..backends.qemu.image_build import ImageBuildError, build_main

    try:
        digest = build_main(Path(a.out), a.flavour, Path(a.cache) if a.cache else None)
    except ImageBuildError as e:
        raise CliError(str(e)) from e
    print(f"built {a.out} (os_image_hash {digest})")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("image", help="guest images: push to a registry, pull into the vmm")
    cmds = s.add_subparsers(dest="image_command", required=True)
    p = cmds.add_parser("push", help="publish an image directory to a registry (local)")
    p.add_argument("dir", help="image directory (with metadata.json)")
    p.add_argument("ref", help="[http://]host[:port]/repo:tag")
    p.set_defaults(func=cmd_push, local=True)
    p = cmds.add_parser("registry", help="tags of the vmm's [image] registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_registry)
    p = cmds.add_parser("pull", help="make the vmm pull a tag into its image directory")
    p.add_argument("tag")
    p.add_argument("--wait", action="store_true", help="until the pull has ended")
    p.set_defaults(func=cmd_pull)
    p = cmds.add_parser("build", help="build a qemu guest image from debian packages (local)")
    p.add_argument("--flavour", choices=("dev", "prod"), default="dev")
    p.add_argument("--out", required=True, help="the image directory to create")
    p.add_argument("--cache", help="download cache (default .cache/guest-image)")
    p.set_defaults(func=cmd_build, local=True)
    p = cmds.add_parser("rm", help="delete an image directory no vm uses")
    p.add_argument("name")
    p.set_defaults(func=cmd_rm)
