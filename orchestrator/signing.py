"""Ray Tune's pickled sweep state is restored only when this user wrote it: an HMAC per file, with a key
kept outside every sweep directory.

    sign_state(sweep_dir)      # the launcher, after each save of Tune's state: bvit_signatures.json
    verify_state(sweep_dir)    # `launch --resume`, before Tune reads a byte of it: UserError naming the file

Tune keeps its state as pickles (`tuner.pkl`, the searcher's `*-state-*` files, cloudpickled values in hex
inside `experiment_state-*.json`): restoring a sweep directory runs whatever code its author put there. A
sweep directory is what people share (cluster storage, a result tarball, a colleague's run), so resume
restores only state whose every pickled file carries this user's signature. `--trust-state` is the
deliberate way to resume a directory from someone else (it is signed with this user's key afterwards).

The key is 32 random bytes in `$BVIT_SWEEP_KEY_FILE`, else `$XDG_CONFIG_HOME/bvit-sweep/state.key` (default
`~/.config`), created mode 0600 on first use. The read-only commands (status, frontier, sync, ui) never
unpickle anything: they read the project's own JSON records (`orchestrator.records`).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from orchestrator.errors import UserError

__all__ = ["KEY_ENV", "SIGNATURES", "TRUST_FLAG", "key_path", "pickled_state", "sign_state", "verify_state"]

KEY_ENV = "BVIT_SWEEP_KEY_FILE"
SIGNATURES = "bvit_signatures.json"  # in the sweep directory: {file (relative) -> HMAC-SHA256 hex}
TRUST_FLAG = "--trust-state"
# The files of a sweep directory that Ray Tune 2.60's restore unpickles: tuner.pkl, the experiment state (its
# cloudpickled values), the searcher's and the callbacks' states. (Each trial's params.pkl is only written and
# copied, never read back: no command here reads it either.)
_PATTERNS = ("*.pkl", "experiment_state-*.json", "*-state-*.json", "*.pickle")


def key_path() -> Path:
    """Where this user's signing key lives (outside every sweep directory)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "bvit-sweep" / "state.key"


def _key() -> bytes:
    """This user's key; created (0600, in a 0700 directory) when there is none."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        raise UserError([f"{path}: damaged signing key (not hex); remove it to make a new one (sweeps signed "
                         f"with the old key then need `{TRUST_FLAG}` once to resume)"]) from None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another launcher made it a moment ago
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def pickled_state(sweep_dir: Path) -> list[Path]:
    """The files of Tune's state in `sweep_dir` that hold pickles, in a stable order."""
    found = {p for pattern in _PATTERNS for p in sweep_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def _mac(key: bytes, sweep_dir: Path, path: Path) -> str:
    mac = hmac.new(key, path.relative_to(sweep_dir).as_posix().encode() + b"\0", hashlib.sha256)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def sign_state(sweep_dir: Path, *, staging: Path | None = None) -> dict[str, str]:
    """Sign every pickled file of Tune's state in `sweep_dir` with this user's key and (atomically) replace
    `bvit_signatures.json`; returns {file -> signature}.

    `staging`: Tune's driver staging directory, which its next sync uploads into `sweep_dir` whole: its files
    are signed as they are there (over the older copies in `sweep_dir`) and the signatures written there,
    so that they reach the sweep directory in the same sync as the state they sign."""
    key = _key()
    signed = {}
    for root in (sweep_dir, staging) if staging is not None else (sweep_dir,):
        signed.update({p.relative_to(root).as_posix(): _mac(key, root, p) for p in pickled_state(root)})
    out = staging if staging is not None else sweep_dir
    tmp = out / f".{SIGNATURES}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": dict(sorted(signed.items()))}, indent=1))
    tmp.replace(out / SIGNATURES)
    return signed


def verify_state(sweep_dir: Path) -> None:
    """A one-line `UserError` (exit 2) naming the first pickled file of Tune's state in `sweep_dir` whose
    signature is missing or does not match this user's key. Reads the files as bytes only."""
    hint = (f"it was not written by a sweep this user launched (or was changed since); restoring it would run "
            f"the code its pickles hold. Resume only a sweep you trust, with `{TRUST_FLAG}`")
    try:
        doc = json.loads((sweep_dir / SIGNATURES).read_text())
        signed = doc["files"]
        if not isinstance(signed, dict):
            raise TypeError
    except FileNotFoundError:
        signed = {}
    except (ValueError, KeyError, TypeError, RecursionError):
        raise UserError([f"{sweep_dir / SIGNATURES}: damaged; {hint}"]) from None
    key = _key()
    for path in pickled_state(sweep_dir):
        name = path.relative_to(sweep_dir).as_posix()
        expected = signed.get(name)
        if not isinstance(expected, str):
            raise UserError([f"{path}: no signature from this user's key ({key_path()}); {hint}"])
        if not hmac.compare_digest(expected, _mac(key, sweep_dir, path)):
            raise UserError([f"{path}: its signature does not match this user's key ({key_path()}); {hint}"])
