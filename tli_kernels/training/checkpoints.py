"""Training checkpoints: sharded training state (torch.distributed.checkpoint), checksums, and the
Hugging Face export next to it.

OUTPUT/step-000100/
  state/                 DCP: each rank writes its own shard files (__R_0.distcp), rank 0 .metadata;
                         the model (unfolded, with learnable alphas) and the optimizer, resharded by
                         DCP on load, so --resume may run on another world size
  training_state.json    step, trajectory, scheduler, RNG, data position, alpha multipliers, plan
                         digest, history and held-out losses (JSON: nothing is unpickled on resume)
  tli_checkpoint.json    the manifest, written last: every file above with its size and sha256
  config.json, *.safetensors, tokenizer, tli_provenance.json, tli_training.json
                         the Hugging Face export (alpha folded; at the end of each run, or at every
                         save with --export every), loadable by stock transformers
A checkpoint is written to step-N.tmp and renamed when complete; `latest_checkpoint` takes only
renamed folders with a manifest. Before --resume trusts a checkpoint, every file under it must be
a regular file listed in the manifest (`check_listed`: a shard copied in from another run, or one
whose entry was dropped, is refused) and every listed file's sha256 is rechecked (`verify_files`:
a zeroed or truncated file of the right name is refused). The DCP state is then read by
`safe_dcp`, which never unpickles anything but DCP's metadata classes and plain data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat

from tli_kernels.checkpoint.executor_python import fsync_dir

STATE_DIR = "state"
STATE_FILE = "training_state.json"
MANIFEST_FILE = "tli_checkpoint.json"
TRAINING_FILE = "tli_training.json"
PROVENANCE_FILE = "tli_provenance.json"
MANIFEST_FORMAT = "tli-training-checkpoint/2"
TMP_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(output: str, step: int) -> str:
    return os.path.join(output, f"step-{step:06d}")


def latest_checkpoint(output: str) -> str | None:
    """The renamed checkpoint with a manifest and the most steps under output, or None."""
    if not os.path.isdir(output):
        return None
    best = None
    for name in os.listdir(output):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(output, name, MANIFEST_FILE)):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), name)
    return os.path.join(output, best[1]) if best else None


def check_output_writable(output: str) -> None:
    """Create output if needed and prove a file can be written there (before any model is loaded)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output}: exists and is not a folder")
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, f".tli-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--output {output}: not writable ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------- JSON files
def read_json(path: str) -> dict | None:
    """A JSON object from path; None when the file does not exist; ValueError naming it otherwise."""
    from tli_kernels.checkpoint.validate import load_json_object  # the one JSON validation layer

    try:
        return load_json_object(path, os.path.basename(path))
    except FileNotFoundError:
        return None


def write_json(path: str, data) -> None:
    """Write via a temporary file, fsynced, renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------- provenance helpers
def injected_layers(provenance: dict | None) -> list[int]:
    if not provenance:
        return []
    if provenance.get("injected_layers") is not None:
        return sorted(int(i) for i in provenance["injected_layers"])
    return [int(e["index"]) for e in provenance.get("layers", []) if e.get("role") == "injected"]


def base_scales(provenance: dict | None) -> dict[int, float]:
    """alpha already folded into each injected layer's weights (1.0 where the provenance says nothing)."""
    raw = (provenance or {}).get("residual_scales") or {}
    return {i: float(raw.get(str(i), 1.0)) for i in injected_layers(provenance)}


# ----------------------------------------------------------------------------------- checksums
def file_sha256(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def describe_files(root: str, names: list[str]) -> dict[str, dict]:
    """{relative name: {size, sha256}} of the given files under root."""
    out = {}
    for name in names:
        path = os.path.join(root, name)
        out[name] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    return out


def write_manifest(folder: str, step: int, files: dict[str, dict], plan_sha256: str) -> None:
    write_json(
        os.path.join(folder, MANIFEST_FILE),
        {"format": MANIFEST_FORMAT, "step": step, "plan_sha256": plan_sha256, "files": dict(sorted(files.items()))},
    )
    fsync_dir(folder)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST_FILE)
    manifest = read_json(path)
    if manifest is None:
        raise ValueError(f"{path}: missing; the checkpoint is incomplete")
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
        raise ValueError(f"{path}: not a tli training checkpoint manifest (format {manifest.get('format')!r})")
    for name, entry in files.items():
        if (
            not isinstance(name, str)
            or os.path.isabs(name)
            or ".." in name.split("/")
            or "" in name.split("/")
            or not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            raise ValueError(f"{path}: bad entry for {name!r}")
    return manifest


def check_listed(folder: str, manifest: dict) -> None:
    """Raise naming the first entry under folder that is not a regular file listed in the manifest
    (the manifest itself aside): --resume reads nothing a checkpoint does not list."""
    listed = set(manifest["files"])
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                continue
            if rel == MANIFEST_FILE and root == folder and stat.S_ISREG(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(
                    f"{path}: not a regular file (a link or a special file) inside a checkpoint; "
                    "tli reads only the regular files a checkpoint's manifest lists"
                )
            if rel not in listed:
                raise ValueError(
                    f"{path}: not listed in {os.path.join(folder, MANIFEST_FILE)} (a file from another run, or "
                    "one whose entry was removed); tli reads only the files a checkpoint lists: remove it, or "
                    "resume from a checkpoint saved whole"
                )


def verify_files(folder: str, manifest: dict, names: list[str]) -> None:
    """Raise naming the first of `names` whose size or sha256 differs from the manifest."""
    for name in names:
        entry = manifest["files"][name]
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ValueError(
                f"{path}: listed in {MANIFEST_FILE} but missing; the checkpoint cannot be resumed"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a link or a special file); the checkpoint is refused")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise ValueError(f"{path}: {size} bytes, the manifest recorded {entry['size']}; the checkpoint is damaged")
        if file_sha256(path) != entry["sha256"]:
            raise ValueError(f"{path}: content does not match the sha256 recorded when it was saved (damaged)")


def remove_quietly(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def replace_dir(tmp: str, final: str) -> None:
    """Move a finished tmp folder to final (replacing an older one of the same step)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
