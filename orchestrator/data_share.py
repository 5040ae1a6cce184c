"""The trials' data through the sweep's object storage, for clusters whose nodes share no folder.

    sources = publish_data(data_paths, "s3://bucket/prefix")   # launcher: {data dir: its URI}, uploaded once
    stage_data_on_nodes(sources)                                # once Ray is up: every trial node has it, or one line
    path = local_data(source, original)                         # in a trial: the folder it reads on this node

When a sweep's storage is a URI, the launcher publishes each data dir it prepared under
`<storage>/.bvit-data/<dir name>-<key>/` (key: the digest of the files' SHA-256s, so the same data is uploaded
once for every sweep on that storage, and other data never overwrites it; `manifest.json` goes up last and marks
the copy complete). A trial reads the launcher's folder itself when its node sees the same files there (a shared
mount, or the launcher's own node: size and first 64 KiB, as `data_prep`'s check compares), else a copy in the
node's cache (`$BVIT_DATA_CACHE`, default `~/.cache/bvit-sweep/data`): fetched once per node under a file lock
that the node's trials share, every file's SHA-256 checked against the manifest, then renamed into place in one
step -- a half-fetched copy is never read. Before any trial starts, a task of no CPUs on each trial node does the
same, so a node that cannot reach the storage (no credentials, no route) is named in one line before training.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from orchestrator.errors import UserError

__all__ = ["DATA_PREFIX", "MANIFEST", "STAGE_S", "data_cache", "local_data", "publish_data", "stage_data_on_nodes"]

DATA_PREFIX = ".bvit-data"  # under the storage URI, beside the sweeps
MANIFEST = "manifest.json"
STAGE_S = 900.0  # how long the nodes have to fetch the data before the first trial


def _describe(path: Path) -> dict[str, object]:
    """{size, sha256, head}: the whole file's digest, and data_prep's fingerprint (the cheap same-files check)."""
    from orchestrator.data_prep import fingerprint

    whole = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            whole.update(chunk)
    size, head = fingerprint(str(path))
    return {"size": size, "sha256": whole.hexdigest(), "head": head}


def _read_manifest(fs, remote: str) -> dict | None:
    import pyarrow.fs

    if fs.get_file_info(f"{remote}/{MANIFEST}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{remote}/{MANIFEST}") as f:
        return json.loads(f.read())


def publish_data(data_paths: dict[str, str], storage: str) -> dict[str, str]:
    """{absolute data dir: the URI of its copy on `storage`}, uploading each dir the storage does not hold yet."""
    from orchestrator.data_prep import data_files
    from orchestrator.storage import open_uri

    fs, root = open_uri(storage)
    sources: dict[str, str] = {}
    for d in sorted(set(data_paths.values())):
        files = {name: _describe(Path(d) / name) for name in data_files()}
        key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        rel = f"{DATA_PREFIX}/{Path(d).name}-{key}"
        remote = f"{root}/{rel}"
        if (_read_manifest(fs, remote) or {}).get("files") != files:
            print(f"publishing {d} to {storage.rstrip('/')}/{rel} (once: every node fetches it from there)")
            fs.create_dir(remote)
            for name in files:
                with open(Path(d) / name, "rb") as src, fs.open_output_stream(f"{remote}/{name}") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            with fs.open_output_stream(f"{remote}/{MANIFEST}") as dst:  # last: the copy is complete
                dst.write(json.dumps({"source": d, "files": files}, indent=1, sort_keys=True).encode())
        sources[d] = f"{storage.rstrip('/')}/{rel}"
    return sources


def data_cache() -> Path:
    """This node's cache of data fetched from storage."""
    if os.environ.get("BVIT_DATA_CACHE"):
        return Path(os.environ["BVIT_DATA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bvit-sweep" / "data"


def _same_files(folder: str, files: dict[str, dict]) -> bool:
    """Whether `folder` holds the manifest's files, as data_prep's node check compares them (size, first 64 KiB)."""
    from orchestrator.data_prep import fingerprint

    try:
        return all(fingerprint(os.path.join(folder, name)) == [want["size"], want["head"]]
                   for name, want in files.items())
    except OSError:
        return False


def local_data(source: str, original: str) -> str:
    """The data dir a trial on this node reads: `original` when this node sees the published files there, else
    this node's verified copy of `source` (fetched here once; concurrent trials wait for the one fetch)."""
    from orchestrator.storage import open_uri

    copy = data_cache() / source.rstrip("/").rsplit("/", 1)[-1]
    if (copy / MANIFEST).is_file():  # renamed into place only once verified
        return str(copy)
    fs, remote = open_uri(source)
    manifest = _read_manifest(fs, remote)
    if manifest is None:
        raise FileNotFoundError(f"{source}/{MANIFEST} not found (was the sweep's data published there?)")
    files = manifest["files"]
    if _same_files(original, files):
        return original
    copy.parent.mkdir(parents=True, exist_ok=True)
    with open(copy.parent / f".{copy.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per node; the others find it done
        if (copy / MANIFEST).is_file():
            return str(copy)
        tmp = Path(tempfile.mkdtemp(prefix=f".{copy.name}.", dir=copy.parent))
        try:
            for name, want in files.items():
                digest = hashlib.sha256()
                with fs.open_input_stream(f"{remote}/{name}") as src, open(tmp / name, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
                if digest.hexdigest() != want["sha256"]:
                    raise OSError(f"{source}/{name}: its SHA-256 differs from the manifest's (a corrupt or changed copy)")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            tmp.rename(copy)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)
    return str(copy)


def _stage(sources: dict[str, str]) -> list[str]:
    """On one node: fetch every source (or find the launcher's folder); what went wrong, one item per source."""
    problems = []
    for original, source in sources.items():
        try:
            local_data(source, original)
        except Exception as e:  # the SDK's reason: no credentials, refused, denied, a bad copy
            problems.append(f"cannot fetch {source} ({type(e).__name__}: {' '.join(str(e).split())[:240]})")
    return problems


def stage_data_on_nodes(sources: dict[str, str], *, timeout_s: float = STAGE_S) -> None:
    """Every alive trial node has the published data (its cache, or the launcher's folder), or a one-line
    `UserError` naming each node that cannot get it. Needs Ray initialised."""
    from orchestrator.data_prep import nodes_line, on_each_node, trial_nodes

    nodes = trial_nodes(skip_driver_node=False)
    if not nodes or not sources:
        return
    if bad := on_each_node(_stage, sources, nodes, timeout_s=timeout_s):
        raise UserError([f"data: {len(bad)} node(s) cannot get the trials' data from the sweep's storage -- "
                         f"{nodes_line(bad)}; "
                         "give every node the storage's credentials and endpoint (the AWS_* variables for s3://), "
                         "then launch again"])
