"""Give a new virtual environment the torch stack of another one by hard links.

Usage: python share_packages.py SOURCE_SITE_PACKAGES TARGET_SITE_PACKAGES REQUIREMENT...

Each REQUIREMENT is `name==version` (torch==2.14.1). When SOURCE holds every one of them at
exactly that version, every file of those distributions and of the distributions they need
that are GPU libraries (nvidia-*, cuda-*, triton; read from each dist-info's METADATA,
recursively) is hard-linked into TARGET, where pip then finds them installed and skips them;
pip installs the small pure-Python dependencies (sympy, jinja2, ...) as usual. A CUDA build of torch with its NVIDIA
libraries is about 5 GB: a second host's environment costs that much less disk. Nothing is
copied when a requirement is missing from SOURCE, when TARGET already has any of the
distributions, or when the two folders are on different file systems (exit code 1: install
normally). Files are linked, never copied, and pip never writes into an installed file (it
removes and rewrites), so an upgrade in one environment leaves the other as it was.
"""

import os
import re
import sys
from pathlib import Path


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_infos(site):
    """canonical name -> (version, dist-info folder) for every distribution in `site`."""
    found = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].rpartition("-")
        if name:
            found[canonical(name)] = (version, info)
    return found


def requires(info):
    """The names a distribution may need, extras included (`closure` keeps those `source` has)."""
    names = []
    for line in (info / "METADATA").read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("Requires-Dist:"):
            if not line.strip():
                break  # the headers end at the first empty line
            continue
        spec = line.split(":", 1)[1]
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if match:
            names.append(canonical(match.group(1)))
    return names


HEAVY = ("nvidia-", "cuda-", "triton")


def closure(source, wanted):
    """The distributions in `wanted` and the GPU libraries they need, as far as `source` has them."""
    todo, seen = list(wanted), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in source or (name not in wanted and not name.startswith(HEAVY)):
            continue
        seen.add(name)
        todo.extend(requires(source[name][1]))
    return seen


def files_of(info, site):
    """Every file of a distribution inside `site` (its RECORD), scripts outside it left out."""
    out = []
    for row in (info / "RECORD").read_text(encoding="utf-8").splitlines():
        rel = row.split(",", 1)[0]
        path = (site / rel).resolve()
        if rel and path.is_relative_to(site.resolve()) and path.is_file():
            out.append(path.relative_to(site.resolve()))
    return out


def main(argv):
    source_site, target_site = Path(argv[1]), Path(argv[2])
    pins = dict(arg.split("==", 1) for arg in argv[3:])
    source, target = dist_infos(source_site), dist_infos(target_site)
    for name, version in pins.items():
        if source.get(canonical(name), (None,))[0] != version:
            print(f"share_packages: {source_site} has no {name}=={version}", file=sys.stderr)
            return 1
    names = closure(source, [canonical(n) for n in pins])
    if any(name in target for name in names):
        print(f"share_packages: {target_site} already has some of them", file=sys.stderr)
        return 1
    if os.stat(source_site).st_dev != os.stat(target_site).st_dev:
        print("share_packages: the two environments are on different file systems", file=sys.stderr)
        return 1
    linked = []
    try:
        for name in sorted(names):
            for rel in files_of(source[name][1], source_site):
                dest = target_site / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(source_site / rel, dest)
                linked.append(dest)
    except OSError as error:  # leave the target as it was; pip installs instead
        for dest in linked:
            dest.unlink()
        print(f"share_packages: could not link ({error})", file=sys.stderr)
        return 1
    print(f"share_packages: linked {len(names)} distributions ({len(linked)} files) from {source_site}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
