"""Where a model named on the command line or in a recipe lives: a local folder or a Hub id.

A name is a local folder when that path exists (as mergekit decides); otherwise `org/name` or
`org/name@revision` is a Hugging Face Hub id, resolved through `huggingface_hub`: the local cache
first (no network), then, unless HF_HUB_OFFLINE is set, a download of only what a conversion reads
(config, safetensors weights and their index, or `.bin` weights where a repository has no
safetensors; tokenizer and generation files). Offline, a model that is not cached is a one-line
error naming the id and the cache folder it was looked for in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.layout import CONFIG_NAME, INDEX_NAME, SIDE_FILES, SINGLE_NAME, CheckpointLayout
from tli_kernels.checkpoint.torch_bin import BIN_INDEX_NAME, BIN_SINGLE_NAME
from tli_kernels.checkpoint.validate import read_regular

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_CACHE_FOLDER = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[0-9a-f]{40}/?\Z")
_TRUE = ("1", "on", "yes", "true")


@dataclass(frozen=True)
class ModelRef:
    """A model as a recipe or the command line names it: path or Hub id, optional @revision."""

    text: str
    path: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "model") -> ModelRef:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} {text!r}: expected a folder or a Hub id such as org/name[@revision]")
        text = text.strip()
        if "+" in text:
            raise ValueError(
                f"{what} {text!r}: LoRA adapters (model+adapter) are not supported; merge the adapter first"
            )
        if text.count("@") > 1:
            raise ValueError(f"{what} {text!r}: more than one @ (expected org/name@revision)")
        path, _, revision = text.partition("@")
        if not path or (text.count("@") and not revision):
            raise ValueError(f"{what} {text!r}: expected org/name@revision")
        return cls(text=text, path=path, revision=revision or None)

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.path)


@dataclass
class SourceLayout(CheckpointLayout):
    """A CheckpointLayout that remembers where it came from when that was the Hub."""

    origin: dict = field(default_factory=dict)

    def identity(self) -> dict:
        ident = super().identity()
        if self.origin:
            ident["origin"] = dict(self.origin)
        return ident


def open_source(ref: str | ModelRef, what: str = "SRC") -> SourceLayout:
    """Open a model folder or a Hub id (cache first, then a download unless offline)."""
    ref = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref, what)
    if ref.is_local:
        if ref.revision:
            raise ValueError(f"{what} {ref.text!r}: {ref.path} is a local folder; a @revision applies to Hub ids only")
        return SourceLayout.open(ref.path)
    if not _HUB_ID.match(ref.path):
        shown = ref.path if len(ref.path) <= 300 else f"{ref.path[:300]}... ({len(ref.path)} characters)"
        raise CheckpointError("no such directory (nor a Hub id of the form org/name[@revision])", shown)
    folder = hub_snapshot(ref)
    layout = SourceLayout.open(folder)
    layout.origin = {"hub_id": ref.path, "revision": ref.revision or "main", "commit": os.path.basename(folder)}
    return layout


def source_folders(layout) -> list[str]:
    """The folders a (possibly multi-source) layout reads from."""
    inner = getattr(layout, "sources", None)
    return [s.layout.path for s in inner] if inner else [layout.path]


# ---- the Hugging Face cache -----------------------------------------------------------------------
def hub_cache_dir() -> str:
    """Where huggingface_hub keeps models, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_repo_folder(repo_id: str, cache: str | None = None) -> str:
    return os.path.join(cache or hub_cache_dir(), "models--" + repo_id.replace("/", "--"))


def hub_id_of_folder(path: str) -> str | None:
    """org/name for a folder inside the Hub cache (models--org--name/snapshots/<commit>), else None."""
    m = _CACHE_FOLDER.search(os.path.abspath(path).replace(os.sep, "/"))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def fetch_list(repo_files: list[str]) -> list[str]:
    """The files of a repository a conversion needs: top-level config, weights (safetensors when the
    repository has them, else pytorch_model*.bin) with their index, tokenizer and generation files."""
    top = [f for f in repo_files if "/" not in f]
    wanted = {CONFIG_NAME, *SIDE_FILES}
    safetensors = [f for f in top if f.endswith(".safetensors")]
    if safetensors:
        weights = safetensors + [f for f in top if f == INDEX_NAME]
    else:
        weights = [f for f in top if f.startswith("pytorch_model") and (f.endswith(".bin") or f == BIN_INDEX_NAME)]
    return sorted({f for f in top if f in wanted} | set(weights))


def missing_weights(folder: str) -> list[str]:
    """What a cached snapshot lacks to be opened: config.json and every weight file its index names."""
    import json

    missing = [] if os.path.isfile(os.path.join(folder, CONFIG_NAME)) else [CONFIG_NAME]
    for index, single in ((INDEX_NAME, SINGLE_NAME), (BIN_INDEX_NAME, BIN_SINGLE_NAME)):
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    names = set(json.load(f).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                return missing + [index]
            return missing + sorted(n for n in names if not os.path.isfile(os.path.join(folder, str(n))))
        if os.path.isfile(os.path.join(folder, single)):
            return missing
    if any(f.endswith(".safetensors") for f in os.listdir(folder)):
        return missing
    return missing + [SINGLE_NAME]


def hub_snapshot(ref: ModelRef) -> str:
    """The local snapshot folder of a Hub model: from the cache, or downloaded (only what tli reads)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    where = hub_repo_folder(ref.path, cache)
    name = ref.text
    found, lacking = None, []
    try:
        # tli reads the ref itself first: a FIFO there would block huggingface_hub's open() for ever,
        # and a trailing newline (an edited ref) would make it miss a snapshot that is there.
        found = _cached_snapshot(where, ref.revision)
        if found is None:
            found = snapshot_download(ref.path, revision=ref.revision, cache_dir=cache, local_files_only=True)
        lacking = missing_weights(found)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means "not (completely) cached"
        lacking = [_first_line(e)]
    if found and not lacking:
        check_blobs(found)
        return found
    if hub_offline():
        what = (
            f"incomplete in the Hugging Face cache (missing {', '.join(lacking[:3])})"
            if found
            else ("not in the Hugging Face cache")
        )
        raise CheckpointError(f"Hub model {name}: {what} and HF_HUB_OFFLINE is set (looked in {where})")
    unreachable = _hub_unreachable()
    if unreachable:  # huggingface_hub would retry for ~25 s before saying the same
        raise CheckpointError(f"Hub model {name}: not in the Hugging Face cache ({where}) and {unreachable}")
    try:
        from huggingface_hub import list_repo_files

        files = fetch_list(list_repo_files(ref.path, revision=ref.revision))
        folder = snapshot_download(ref.path, revision=ref.revision, cache_dir=cache, allow_patterns=files)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line naming the model
        raise CheckpointError(
            f"Hub model {name}: not in the Hugging Face cache ({where}) and the download failed: {_first_line(e)}"
        ) from e
    lacking = missing_weights(folder)
    if lacking:
        raise CheckpointError(f"Hub model {name}: the repository has no {', '.join(lacking[:3])}", folder)
    check_blobs(folder)
    return folder


BLOB_CHECK_BYTES = 64 << 20  # blobs up to this size are hashed whole each time a snapshot is opened


def check_blobs(snapshot: str) -> None:
    """Each cached file that links to a blob named by its hash (sha256 for LFS files, git's sha1 for
    the others) must still hash to that name: a damaged or edited blob is refused, naming it.
    Blobs over BLOB_CHECK_BYTES (the weights of anything but a tiny model) are not hashed here: that
    would read the whole model on every command; the source identity record samples them instead."""
    import hashlib

    for name in sorted(os.listdir(snapshot)):
        path = os.path.join(snapshot, name)
        if not os.path.islink(path):
            continue
        blob = os.path.realpath(path)
        digest = os.path.basename(blob)
        if os.path.basename(os.path.dirname(blob)) != "blobs" or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", digest):
            continue
        try:
            size = os.stat(blob).st_size
        except OSError:
            continue  # a dangling link: reported as a missing file by whoever opens it
        if size > BLOB_CHECK_BYTES:
            continue
        data = read_regular(blob, "Hub cache blob", limit=BLOB_CHECK_BYTES)
        if len(digest) == 64:
            actual = hashlib.sha256(data).hexdigest()
        else:
            actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if actual != digest:
            raise CheckpointError(
                f"its content does not match the hash it is named by in the Hugging Face cache (now "
                f"{actual[:12]}...); the cache is damaged or was edited: delete {blob} (and the snapshot's link "
                f"{path}) to download it again",
                blob,
            )


_COMMIT = re.compile(r"[0-9a-f]{40}\Z")


def _cached_snapshot(repo_folder: str, revision: str | None) -> str | None:
    """The cached snapshot folder of revision (default main), or None when the cache has none.

    refs/<revision> must be a regular file of at most 1 KiB holding a commit hash (surrounding white
    space, such as a trailing newline, is accepted); anything else is refused naming the file."""
    revision = revision or "main"
    if _COMMIT.match(revision):
        commit = revision
    else:
        if ".." in revision.split("/") or revision.startswith("/"):
            raise ValueError(f"@{revision}: not a revision name")
        ref_path = os.path.join(repo_folder, "refs", revision)
        if not os.path.lexists(ref_path):
            return None
        raw = read_regular(ref_path, "Hub cache ref", limit=1024)
        commit = raw.decode("ascii", errors="replace").strip()
        if not _COMMIT.match(commit):
            raise CheckpointError(
                f"does not hold a commit hash ({commit[:60]!r}); the Hugging Face cache is damaged: delete "
                f"{repo_folder} to download the model again",
                ref_path,
            )
    folder = os.path.join(repo_folder, "snapshots", commit)
    return folder if os.path.isdir(folder) else None


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached when its host name does not even resolve, else None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e}); set HF_HUB_OFFLINE=1 to use the cache only"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
