"""Training tokens and a deterministic, resumable order over them.

Two kinds of training data:

- In memory (`--text FILE`, `--data FILE.npy|.pt` of token ids, or the built-in King James train
  split): one long 1-D stream of ids, cut into non-overlapping windows of `seq_len` tokens.
  Epoch e visits the windows in the order `randperm(num_windows)` drawn from a generator seeded
  with (seed, e), so the sample at any global position is a pure function of (seed, position):
  resuming at step s needs only s, and every rank computes the same order and takes its slice.
- Streamed documents (`--data` naming a .txt / .jsonl / .parquet file, a folder of them, or a
  `datasets` dataset saved with save_to_disk): tokenised on the fly with the model's tokenizer
  and packed into windows. The data is split into G *lanes*, G = the global batch in windows
  (fixed by the run, whatever the world size): lane j owns the j-th of G equal parts of the data
  (bytes of text/JSONL, whose lines are the documents; rows of Parquet/datasets) and yields one
  window per step, read sequentially and wrapping around at its end. Micro-step m of rank r takes
  lanes [(m * world + r) * micro, + micro), the same slice of the global batch as the in-memory
  order, so each rank reads, tokenises and holds only its own lanes' part of the data, and one
  process with accumulation A sees the same windows as A ranks. A lane's position (epoch, the
  unit where its buffered tokens start, tokens already used) is saved in the checkpoint, so
  --resume continues exactly, also on another world size. The held-out split is fixed: the last
  `heldout_fraction` of the units (documents starting there), recorded in tli_training.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

TOKEN_SUFFIXES = (".npy", ".pt")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
READ_BYTES = 1 << 20  # text/JSONL read per group of documents
GROUP_ROWS = 256  # Parquet/datasets rows tokenised per group


def is_token_file(path: str | None) -> bool:
    return path is not None and path.endswith(TOKEN_SUFFIXES)


def check_vocab(ids: torch.Tensor, vocab_size: int, where: str) -> None:
    """Raise naming where, the id and its position when an id is negative or >= vocab_size."""
    if ids.numel() == 0 or not vocab_size:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        pos = int((ids == bad).nonzero()[0, 0]) if ids.dim() == 1 else -1
        raise ValueError(
            f"{where}: token id {bad} at position {pos} is outside the model's vocabulary [0, {vocab_size})"
        )


def load_token_ids(path: str) -> torch.Tensor:
    """A 1-D int64 tensor from a .npy file (any integer dtype) or a .pt file holding one tensor."""
    _check_regular(path, "--data")
    if path.endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"--data {path}: not a plain .npy array ({e})") from e
        ids = torch.from_numpy(np.array(array))  # a copy: torch wants writable memory
    elif path.endswith(".pt"):
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"--data {path}: holds a {type(ids).__name__}, expected one tensor of token ids")
    else:
        raise ValueError(f"--data {path}: expected a .npy or .pt file of token ids")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"--data {path}: token ids must be integers, got {ids.dtype}")
    return ids.reshape(-1).to(torch.long)


def read_text(path: str, flag: str = "--text") -> str:
    """The whole of a UTF-8 text file; a FIFO, a device (/dev/zero) or a socket is refused before it is read."""
    from tli_kernels.checkpoint.validate import open_regular

    try:
        fd = open_regular(path, f"{flag} file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None
    try:
        with os.fdopen(fd, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"{flag} {path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def training_ids(tokenizer, *, text_file: str | None = None, data_file: str | None = None) -> tuple[torch.Tensor, str]:
    """(ids, description) of the training stream: token ids, a text file, or the KJV train split."""
    from tli_kernels.evaluation import tokenize

    if data_file is not None and text_file is not None:
        raise ValueError("give either --text or --data, not both")
    if data_file is not None:
        return load_token_ids(data_file), data_file
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer: give pre-tokenised ids with --data FILE.npy|.pt")
    if text_file is not None:
        return tokenize(tokenizer, read_text(text_file)), text_file
    from tli_kernels.builtin.text import kjv_split

    return tokenize(tokenizer, kjv_split()[0]), "the King James train split"


def heldout_ids(tokenizer, *, text_file: str | None = None, data_file: str | None = None) -> tuple[torch.Tensor, str]:
    """(ids, description) of the held-out stream; by default the KJV held-out split (never trained on)."""
    if data_file is not None or text_file is not None:
        return training_ids(tokenizer, text_file=text_file, data_file=data_file)
    if tokenizer is None:
        raise ValueError("the model folder has no tokenizer: give held-out ids with --eval-data FILE.npy|.pt")
    from tli_kernels.builtin.text import kjv_split
    from tli_kernels.evaluation import tokenize

    return tokenize(tokenizer, kjv_split()[1]), "the King James held-out split"


class WindowOrder:
    """Non-overlapping windows of a token stream in a seeded order; `batch(...)` names one slice.

    One optimizer step consumes a global batch of `global_batch` windows; micro-step m on rank r
    takes windows [(m * world + r) * micro, + micro) of it, so one process with gradient
    accumulation A and A processes without it see the same windows in each step.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int):
        if ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
        self.num_windows = ids.numel() // seq_len
        if self.num_windows == 0:
            raise ValueError(f"the training data has {ids.numel()} tokens, fewer than one window of {seq_len}")
        self.windows = ids[: self.num_windows * seq_len].view(self.num_windows, seq_len)
        self.seq_len = seq_len
        self.seed = seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_windows, generator=g)
        return self._perm

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Windows at global positions [start, start + count): [count, seq_len]."""
        rows = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.num_windows)
            rows.append(self._permutation(epoch)[i])
        return self.windows[torch.stack(rows)]

    def batch(self, step: int, micro_step: int, *, micro_batch: int, accum: int, rank: int = 0, world: int = 1):
        global_batch = micro_batch * accum * world
        start = step * global_batch + (micro_step * world + rank) * micro_batch
        return self.samples(start, micro_batch)


# ----------------------------------------------------------------------------- streamed documents
class _LineCorpus:
    """Text or JSONL files as one byte space; a document is a line, owned by the lane its first byte
    falls in. Text lines keep their newline (running text, no EOS); JSONL lines are objects whose
    `field` holds the document (an EOS token follows each)."""

    def __init__(self, files: list[str], kind: str, field: str):
        self.files, self.kind, self.field = files, kind, field
        self.sizes = [os.path.getsize(f) for f in files]
        self.starts = np.cumsum([0] + self.sizes).tolist()
        self.units = self.starts[-1]
        self.documents_end_with_eos = kind == "jsonl"

    def _locate(self, pos: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return min(i, len(self.files) - 1), pos - self.starts[min(i, len(self.files) - 1)]

    def align(self, pos: int) -> int:
        """The first document start at or after pos (pos itself when a line or file begins there)."""
        if pos <= 0 or pos >= self.units:
            return min(max(pos, 0), self.units)
        i, off = self._locate(pos)
        if off == 0:
            return pos
        with open(self.files[i], "rb") as f:
            f.seek(off - 1)
            while True:
                block = f.read(65536)
                if not block:
                    return self.starts[i + 1]
                nl = block.find(b"\n")
                if nl >= 0:
                    return self.starts[i] + f.tell() - len(block) + nl + 1
        return pos  # pragma: no cover

    def read(self, cursor: int, end: int) -> tuple[list[str], int]:
        """Documents starting in [cursor, end) from about READ_BYTES, and the cursor after them."""
        i, off = self._locate(cursor)
        path = self.files[i]
        texts = []
        with open(path, "rb") as f:
            f.seek(off)
            raw = f.read(READ_BYTES)
            while raw and not raw.endswith(b"\n") and f.tell() < self.sizes[i]:
                more = f.read(65536)  # finish the last line
                raw += more
        pos = cursor
        for line in raw.splitlines(keepends=True):
            if pos >= end:
                break
            text = self._decode(line, path, pos - self.starts[i])
            if text:
                texts.append(text)
            pos += len(line)
        if pos == cursor:  # empty read (end of a file)
            pos = self.starts[i + 1]
        return texts, pos

    def _decode(self, line: bytes, path: str, offset: int) -> str | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--data {path}: not UTF-8 at byte {offset + e.start}") from None
        if self.kind == "text":
            return text
        if not text.strip():
            return None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--data {path}: line at byte {offset} is not JSON ({e})") from None
        value = obj.get(self.field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"--data {path}: line at byte {offset} has no string field {self.field!r}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates, not text
            raise ValueError(
                f"--data {path}: line at byte {offset}: field {self.field!r} holds a lone surrogate "
                f"(\\u{ord(value[e.start]):04x}), which is not Unicode text"
            ) from None
        return value


class _RowCorpus:
    """Parquet files or a datasets dataset as rows; a document is a row's `field`."""

    documents_end_with_eos = True

    def __init__(self, files: list[str] | None, dataset, field: str, name: str):
        self.field, self.name = field, name
        self.dataset = dataset
        if dataset is not None:
            if field not in dataset.column_names:
                raise ValueError(f"--data {name}: no column {field!r} (columns: {', '.join(dataset.column_names)})")
            self.units = len(dataset)
            return
        import pyarrow.parquet as pq

        self.files = files
        self.groups = []  # (file index, row group, first row, rows)
        first = 0
        for fi, path in enumerate(files):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises its own error types
                raise ValueError(f"--data {path}: not a readable Parquet file ({e})") from None
            if field not in meta.schema.names:
                raise ValueError(f"--data {path}: no column {field!r} (columns: {', '.join(meta.schema.names)})")
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self.groups.append((fi, g, first, rows))
                first += rows
        self.units = first
        self._cache = (None, None)

    def align(self, pos: int) -> int:
        return min(max(pos, 0), self.units)

    def read(self, cursor: int, end: int) -> tuple[list[str], int]:
        stop = min(end, cursor + GROUP_ROWS)
        if self.dataset is not None:
            values = self.dataset[cursor:stop][self.field]
        else:
            values = []
            pos = cursor
            while pos < stop:
                fi, g, first, rows = next(x for x in self.groups if x[2] <= pos < x[2] + x[3])
                column = self._row_group(fi, g)
                take = min(stop, first + rows) - pos
                values.extend(column[pos - first : pos - first + take])
                pos += take
        for k, v in enumerate(values):
            if not isinstance(v, str):
                raise ValueError(f"--data {self.name}: row {cursor + k} field {self.field!r} is not a string")
        return list(values), stop

    def _row_group(self, fi: int, g: int) -> list:
        if self._cache[0] != (fi, g):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=[self.field])
            self._cache = ((fi, g), table.column(self.field).to_pylist())
        return self._cache[1]


def open_corpus(path: str, field: str):
    """The document corpus at path (.txt / .jsonl / .parquet file, a folder of one kind, or a
    datasets dataset saved with save_to_disk)."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
            os.path.join(path, "dataset_dict.json")
        ):
            return _RowCorpus(None, _load_dataset(path), field, path)
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
        files = [f for f in files if os.path.isfile(f)]
        kinds = {_kind(f) for f in files} - {None}
        if len(kinds) != 1:
            raise ValueError(
                f"--data {path}: expected a folder of .txt, .jsonl or .parquet files (one kind), found "
                f"{', '.join(sorted(k for k in kinds)) or 'none'}"
            )
        kind = kinds.pop()
        files = [f for f in files if _kind(f) == kind]
    elif os.path.lexists(path):
        _check_regular(path, "--data")
        kind, files = _kind(path), [path]
        if kind is None:
            raise ValueError(
                f"--data {path}: unknown kind; expected .npy/.pt token ids, .txt, .jsonl, .parquet or a datasets folder"
            )
    else:
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if kind == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise RuntimeError(
                f"--data {path}: reading Parquet needs pyarrow (pip install 'tli-kernels[data]')"
            ) from None
        return _RowCorpus(files, None, field, path)
    return _LineCorpus(files, kind, field)


def _check_regular(path: str, flag: str) -> None:
    """Refuse a path that is not a regular file (a FIFO or a device would block or never end)."""
    from tli_kernels.checkpoint.validate import check_regular

    try:
        check_regular(path, f"{flag} file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None


def _kind(path: str) -> str | None:
    if path.endswith(TEXT_SUFFIXES):
        return "text"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _load_dataset(path: str):
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"--data {path}: a datasets folder needs the datasets package (pip install 'tli-kernels[data]')"
        ) from None
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many kinds
        raise ValueError(f"--data {path}: cannot load the dataset ({' '.join(str(e).split())[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"--data {path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    return ds


class Lane:
    """One row of the global batch over time: windows of seq_len tokens from units [lo, hi)."""

    def __init__(self, corpus, lo: int, hi: int, tokenize_fn, seq_len: int, name: str):
        self.corpus, self.hi, self.seq_len, self.name = corpus, hi, seq_len, name
        self.lo = corpus.align(lo)
        self.tokenize = tokenize_fn
        self.epoch, self.cursor = 0, self.lo
        self.groups: list[tuple[int, int, np.ndarray]] = []  # (epoch, first unit, ids)
        self.head = 0  # ids of groups[0] already used
        self._empty_pass = True

    def _read_group(self) -> None:
        if self.cursor >= self.hi:
            if self._empty_pass:
                raise ValueError(f"--data {self.name}: a lane over units [{self.lo}, {self.hi}) holds no tokens; "
                                 "the data is too small for the global batch")  # fmt: skip
            self.epoch, self.cursor, self._empty_pass = self.epoch + 1, self.lo, True
        start = self.cursor
        texts, self.cursor = self.corpus.read(self.cursor, self.hi)
        ids = self.tokenize(texts)
        if len(ids):
            self._empty_pass = False
        self.groups.append((self.epoch, start, ids))

    def next_window(self) -> np.ndarray:
        while sum(len(g[2]) for g in self.groups) - self.head < self.seq_len:
            self._read_group()
        out, need = [], self.seq_len
        while need:
            ids = self.groups[0][2]
            take = min(need, len(ids) - self.head)
            out.append(ids[self.head : self.head + take])
            self.head += take
            need -= take
            if self.head == len(ids):
                self.groups.pop(0)
                self.head = 0
        return np.concatenate(out)

    def state(self) -> list[int]:
        if self.groups:
            epoch, start, _ = self.groups[0]
            return [epoch, start, self.head]
        return [self.epoch, self.cursor, 0]

    def restore(self, state: list[int]) -> None:
        epoch, start, head = (int(x) for x in state)
        self.epoch, self.cursor, self.head, self.groups = epoch, start, head, []
        self._empty_pass = False


class DocumentStream:
    """G lanes over a document corpus; this rank builds only the lanes it reads."""

    def __init__(self, corpus, name: str, tokenizer, *, seq_len: int, lanes: int, train_units: int, mine: list[int],
                 vocab_size: int):  # fmt: skip
        self.corpus, self.name, self.seq_len, self.lanes, self.vocab_size = corpus, name, seq_len, lanes, vocab_size
        eos = tokenizer.eos_token_id if corpus.documents_end_with_eos else None
        self.tokenize = _tokenize_fn(tokenizer, eos)
        bounds = [train_units * j // lanes for j in range(lanes + 1)]
        self.mine = {j: Lane(corpus, bounds[j], bounds[j + 1], self.tokenize, seq_len, name) for j in mine}
        self.next_step = {j: 0 for j in mine}

    def window(self, lane: int, step: int) -> np.ndarray:
        if self.next_step[lane] != step:  # lanes are read in step order only
            raise RuntimeError(f"lane {lane} is at step {self.next_step[lane]}, asked for step {step}")
        ids = self.mine[lane].next_window()
        self.next_step[lane] = step + 1
        check_vocab(torch.from_numpy(ids), self.vocab_size, f"--data {self.name} (lane {lane}, step {step})")
        return ids


def _tokenize_fn(tokenizer, eos: int | None):
    def tokenize(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.int64)
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        parts = []
        for ids in encoded:
            parts.append(np.asarray(ids, dtype=np.int64))
            if eos is not None:
                parts.append(np.asarray([eos], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return tokenize


# ------------------------------------------------------------------------------- one interface
class TrainingData:
    """The training stream and held-out windows of a run, whichever kind the data is."""

    def __init__(self):
        self.order: WindowOrder | None = None
        self.stream: DocumentStream | None = None
        self.heldout: torch.Tensor | None = None
        self.name = self.heldout_name = ""
        self.num_windows: int | None = None
        self.split: dict | None = None

    @classmethod
    def open(cls, tokenizer, *, text_file=None, data_file=None, eval_text_file=None, eval_data_file=None,
             text_field="text", heldout_fraction=0.01, seq_len: int, seed: int, eval_tokens: int, global_batch: int,
             vocab_size: int, rank: int = 0, world: int = 1, micro_batch: int = 1) -> TrainingData:  # fmt: skip
        from tli_kernels.evaluation import windows

        self = cls()
        self.vocab_size = vocab_size
        documents = data_file is not None and not is_token_file(data_file)
        explicit_eval = eval_text_file is not None or eval_data_file is not None
        heldout_ids_ = None
        if documents:
            if text_file is not None:
                raise ValueError("give either --text or --data, not both")
            if tokenizer is None:
                raise ValueError(f"--data {data_file}: the model folder has no tokenizer to tokenise documents with")
            corpus = open_corpus(data_file, text_field)
            train_units = corpus.units
            if not explicit_eval and eval_tokens:
                train_units = corpus.align(int(corpus.units * (1 - heldout_fraction)))
                heldout_ids_ = _read_heldout(corpus, train_units, tokenizer, eval_tokens)
                self.heldout_name = f"{data_file} (held out: units [{train_units}, {corpus.units}))"
                if heldout_ids_.numel() < seq_len:
                    if corpus.align(corpus.units // 2) >= corpus.units:  # no document starts in the last half
                        unit = "line" if isinstance(corpus, _LineCorpus) else "row"
                        raise ValueError(
                            f"--data {data_file}: no {unit} starts in its last half (one long {unit}: no line break), "
                            "so no document can be held out whatever --heldout-fraction is; give held-out text with "
                            "--eval-text or --eval-data, or break the text into lines"
                        )
                    raise ValueError(
                        f"--data {data_file}: the held-out {heldout_fraction:g} holds {heldout_ids_.numel()} tokens, "
                        f"less than one window of --seq-len {seq_len}; raise --heldout-fraction"
                    )
            accum = global_batch // (micro_batch * world)
            mine = [(m * world + rank) * micro_batch + i for m in range(accum) for i in range(micro_batch)]
            self.stream = DocumentStream(corpus, data_file, tokenizer, seq_len=seq_len, lanes=global_batch,
                                         train_units=train_units, mine=mine, vocab_size=vocab_size)  # fmt: skip
            self.name = data_file
            held = heldout_ids_ is not None
            self.split = {
                "unit": "bytes" if isinstance(corpus, _LineCorpus) else "rows",
                "units": corpus.units,
                "train": [0, train_units],
                "heldout": [train_units, corpus.units] if held else None,
                "heldout_fraction": heldout_fraction if held else None,
                "lanes": global_batch,
            }
        else:
            ids, self.name = training_ids(tokenizer, text_file=text_file, data_file=data_file)
            check_vocab(ids, vocab_size, f"--data {data_file}" if data_file else f"--text {text_file or 'built-in'}")
            self.order = WindowOrder(ids, seq_len, seed)
            self.num_windows = self.order.num_windows
        if eval_tokens:
            if heldout_ids_ is None:
                heldout_ids_, self.heldout_name = heldout_ids(
                    tokenizer, text_file=eval_text_file, data_file=eval_data_file
                )
                where = (
                    f"--eval-data {eval_data_file}" if eval_data_file else f"--eval-text {eval_text_file or 'built-in'}"
                )
                check_vocab(heldout_ids_, vocab_size, where)
            self.heldout = windows(heldout_ids_, seq_len, eval_tokens)
        return self

    def batch(self, step: int, micro_step: int, *, micro_batch: int, accum: int, rank: int = 0, world: int = 1):
        if self.order is not None:
            return self.order.batch(step, micro_step, micro_batch=micro_batch, accum=accum, rank=rank, world=world)
        first = (micro_step * world + rank) * micro_batch
        rows = [self.stream.window(first + i, step) for i in range(micro_batch)]
        return torch.from_numpy(np.stack(rows))

    def state(self, step: int) -> dict:
        """What resume needs (gathered from every rank: each holds only its lanes)."""
        if self.order is not None:
            return {"kind": "windows", "step": step}
        import torch.distributed as dist

        mine = {str(j): lane.state() for j, lane in self.stream.mine.items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            mine = {k: v for p in parts for k, v in p.items()}
        return {"kind": "lanes", "step": step, "lanes": mine}

    def restore(self, state: dict | None) -> None:
        if self.stream is None:
            return
        if not isinstance(state, dict) or state.get("kind") != "lanes" or not isinstance(state.get("lanes"), dict):
            raise ValueError("--resume: the checkpoint has no lane positions for this --data")
        for j, lane in self.stream.mine.items():
            saved = state["lanes"].get(str(j))
            if not (isinstance(saved, list) and len(saved) == 3):
                raise ValueError(f"--resume: the checkpoint has no position for data lane {j}")
            lane.restore(saved)
            self.stream.next_step[j] = int(state["step"])


def _read_heldout(corpus, start: int, tokenizer, tokens: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id if corpus.documents_end_with_eos else None
    tokenize = _tokenize_fn(tokenizer, eos)
    parts, have, cursor = [], 0, start
    while cursor < corpus.units and have < tokens:
        texts, cursor = corpus.read(cursor, corpus.units)
        ids = tokenize(texts)
        parts.append(ids)
        have += len(ids)
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
