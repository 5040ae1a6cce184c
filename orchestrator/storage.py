"""Where a sweep's state lives: a local folder, or a URI that pyarrow's filesystems open (`s3://bucket/prefix`).

    where = sweep_location(spec, storage, smoke=False)    # <storage>/<name>
    where.dir          # the sweep directory on this machine: the sweep itself, or (a URI) a local copy of it
    where.tune_path    # what Ray Tune is given: the same folder, or the URI (its state and checkpoints go there)
    where.pull()       # a URI: its files (checkpoints aside) into `dir`, replacing the copy there
    where.push()       # a URI: the project's own files in `dir` that changed since the last push, up to it

Ray Tune writes a URI storage itself (pyarrow's filesystem; the driver stages its state locally and syncs it
up; checkpoints go up from the node that wrote them). Everything else in the project reads and writes a local
sweep directory, so for a URI that directory is a copy in the cache (`$BVIT_SWEEP_CACHE`, else
`$XDG_CACHE_HOME/bvit-sweep/storage`, default `~/.cache`; one folder per URI): a command that reads a sweep
pulls it first, and the files the launcher writes of its own (the snapshot, the trial records, the
signatures, a search's state, the launch log) go back with `push`. Checkpoints are not pulled.

Credentials and endpoint come only from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL: pyarrow 25's S3 honours each), or the
other schemes' own; nothing here writes them anywhere. Ray Tune's `tuner.pkl` holds the URI as a string only.
`storage_problems` opens the URI and looks at its bucket (or top folder) within PROBE_S, so a URI that cannot be
opened or reached is one line before Ray starts, never a local folder named after it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["OWN_FILES", "PROBE_S", "SweepLocation", "cache_root", "is_uri", "location_of", "open_uri",
           "storage_problems", "sweep_location", "sweep_name"]

PROBE_S = 20.0  # how long a storage URI has to answer (pyarrow's S3 retries a refused connection for ~6 s)
CACHE_ENV = "BVIT_SWEEP_CACHE"
# The project's own files in a sweep directory (the rest is Ray Tune's): what `push` sends up.
OWN_FILES = ("bvit_sweep.json", "launches.jsonl", "bvit_signatures.json", "search.json", "bvit_trials/*.json")
_SKIP = ("checkpoint_", ".")  # folders `pull` leaves behind: checkpoints (large; read through Ray) and hidden ones


def is_uri(storage: str | os.PathLike) -> bool:
    """`scheme://...` other than `file://` (a local path spelt as a URI)."""
    text = str(storage)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def _local_path(storage: str) -> Path:
    text = storage[len("file://"):] if storage.lower().startswith("file://") else storage
    return Path(text).expanduser().resolve()


def cache_root() -> Path:
    """Where the local copies of sweeps on URI storage are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bvit-sweep" / "storage"


def open_uri(uri: str):
    """(pyarrow FileSystem, path in it) of a URI; ValueError with the filesystem's reason when it cannot."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # ArrowInvalid (unknown scheme, no bucket), OSError (a library that is missing)
        raise ValueError(str(e).splitlines()[0] or type(e).__name__) from None
    if not path.strip("/"):
        raise ValueError("no bucket (or top folder) in it")
    return fs, path.rstrip("/")


def storage_problems(storage: str, *, source: str, timeout_s: float = PROBE_S) -> list[str]:
    """One line when `storage` is a URI that pyarrow cannot open, or whose bucket (or top folder) does not
    answer within `timeout_s` or does not exist; [] for a local folder (made when the sweep starts)."""
    if not is_uri(storage):
        return []
    what = f"{source} {storage}" if source.startswith("--") else f"{source}: storage: {storage}"
    hint = ("set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an S3-compatible server and AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, or pass --storage DIR for a local folder")
    found: dict[str, Any] = {}

    def look() -> None:  # opening an s3:// URI may ask the server already (the bucket's region)
        try:
            fs, path = open_uri(storage)
        except ValueError as e:
            found["invalid"] = str(e)
            return
        found["top"] = PurePosixPath(path).parts[0]
        try:
            found["info"] = _few_retries(fs).get_file_info(found["top"])
        except Exception as e:  # OSError from the SDK: refused, unresolvable, denied
            found["error"] = " ".join(str(e).split())[:300]

    probe = threading.Thread(target=look, name="storage-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
    top = found.get("top", storage)
    if probe.is_alive():
        return [f"{what}: {top} did not answer within {timeout_s:g} s; {hint}"]
    if "invalid" in found:
        if found["invalid"].startswith("When "):  # the SDK's own words: a server that did not answer
            return [f"{what}: cannot reach it ({found['invalid']}); {hint}"]
        return [f"{what}: cannot be opened ({found['invalid']}); use a local folder or a URI pyarrow's filesystems "
                "open (s3://bucket/prefix, gs://bucket/prefix)"]
    if "error" in found:
        return [f"{what}: cannot reach {top} ({found['error']}); {hint}"]
    import pyarrow.fs

    if found["info"].type == pyarrow.fs.FileType.NotFound:
        return [f"{what}: bucket {top} does not exist; create it (e.g. `aws s3 mb s3://{top}`) or name another"]
    return []


def _few_retries(fs):
    """An S3 filesystem like `fs` that tries twice (~1 s to a refused port) instead of pyarrow's default retries
    (~6 s): for the probe only; the sweep's own I/O keeps the defaults."""
    import pyarrow.fs

    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return fs
    try:  # its options as pyarrow pickles them: the constructor's keywords
        return pyarrow.fs.S3FileSystem(**fs.__reduce__()[1][0],
                                       retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=2))
    except Exception:  # another pyarrow's options: probe with the defaults
        return fs


@dataclass
class SweepLocation:
    """A sweep's directory: `dir` on this machine, and the `uri` it lives at when its storage is a URI."""

    dir: Path  # what every local reader and writer uses: the sweep directory, or its local copy
    uri: str | None = None  # <storage URI>/<name>, or None for a local storage
    _pushed: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _fs: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def tune_path(self) -> str:
        """The experiment path Ray Tune is given (RunConfig's storage_path + name; Tuner.restore's path)."""
        return self.uri or str(self.dir)

    @property
    def storage_path(self) -> str:
        """RunConfig's `storage_path`: the folder or URI the sweep's directory lies in."""
        return self.uri.rsplit("/", 1)[0] if self.uri else str(self.dir.parent)

    def __str__(self) -> str:  # what messages name: where the sweep really is
        return self.tune_path

    def exists(self) -> bool:
        """Whether the remote sweep has Tune's state (a local one: whether its folder has)."""
        if self.uri is None:
            return (self.dir / "tuner.pkl").is_file()
        import pyarrow.fs

        fs, path = self._filesystem()
        return fs.get_file_info(f"{path}/tuner.pkl").type == pyarrow.fs.FileType.File

    def pull(self) -> int:
        """Replace the local copy with the URI's files, checkpoints left out; the number of files fetched.
        Nothing for a local storage."""
        if self.uri is None:
            return 0
        import pyarrow.fs

        fs, root = self._filesystem()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        files = [i.path for i in infos if i.type == pyarrow.fs.FileType.File
                 and not any(part.startswith(_SKIP) for part in PurePosixPath(i.path).relative_to(root).parts[:-1])]
        fresh = self.dir.parent / f".{self.name}.pull"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda remote: _download(fs, remote, fresh / PurePosixPath(remote).relative_to(root)), files))
        shutil.rmtree(self.dir, ignore_errors=True)
        fresh.rename(self.dir)
        self._pushed = {p: _stamp(self.dir / p) for p in self._own()}  # what was fetched needs no push
        return len(files)

    def pull_checkpoint(self, trial_id: str) -> Path | None:
        """A URI: the trial's newest checkpoint folder, fetched into the local copy (`pull` leaves checkpoints out);
        its local path, or None when it has none. Nothing for a local storage (its checkpoints are in `dir`)."""
        if self.uri is None:
            return None
        import pyarrow.fs

        fs, root = self._filesystem()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{trial_id}", allow_not_found=True))
        folders = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                         and PurePosixPath(i.path).name.startswith("checkpoint_"))
        if not folders:
            return None
        local = self.dir / trial_id / PurePosixPath(folders[-1]).name
        for info in fs.get_file_info(pyarrow.fs.FileSelector(folders[-1], recursive=True)):
            if info.type == pyarrow.fs.FileType.File:
                _download(fs, info.path, local / PurePosixPath(info.path).relative_to(folders[-1]))
        return local

    def push(self, *, exclude: tuple[str, ...] = ()) -> int:
        """Upload the project's own files (OWN_FILES, less `exclude`) that changed since the last pull or push; the
        number sent. Nothing for a local storage."""
        if self.uri is None:
            return 0
        changed = {rel: stamp for rel in self._own() if rel not in exclude
                   and self._pushed.get(rel) != (stamp := _stamp(self.dir / rel))}
        if not changed:
            return 0
        fs, root = self._filesystem()
        for rel, stamp in changed.items():
            with open(self.dir / rel, "rb") as src, fs.open_output_stream(f"{root}/{rel}") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            self._pushed[rel] = stamp
        return len(changed)

    def _filesystem(self):
        """(filesystem, path) of `uri`, opened once (an S3 client takes a moment to make)."""
        if self._fs is None:
            self._fs = open_uri(self.uri)
        return self._fs

    def __getstate__(self) -> dict[str, Any]:  # pickled with Tune's callbacks: no client, nothing pushed yet
        return {"dir": self.dir, "uri": self.uri, "_pushed": {}, "_fs": None}

    def _own(self) -> list[str]:
        return sorted({p.relative_to(self.dir).as_posix() for pattern in OWN_FILES for p in self.dir.glob(pattern)
                       if p.is_file()})


def _download(fs, remote: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(remote) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def location_of(storage: str, name: str) -> SweepLocation:
    """The sweep `name` under `storage` (a folder or a URI): a URI's local copy is `<cache>/<hash of URI>/name`."""
    if not is_uri(storage):
        return SweepLocation(dir=_local_path(storage) / name)
    uri = f"{storage.rstrip('/')}/{name}"
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return SweepLocation(dir=cache_root() / key / name, uri=uri)


def sweep_name(spec, smoke: bool) -> str:
    """A smoke run is its own sweep (<name>-smoke), so it never collides with the real one."""
    return spec.name + ("-smoke" if smoke else "")


def sweep_location(spec, storage: str | None = None, *, smoke: bool = False) -> SweepLocation:
    """Where Ray Tune keeps this sweep's state: <storage>/<name> (storage from the CLI, else the spec)."""
    return location_of(storage or spec.storage, sweep_name(spec, smoke))
