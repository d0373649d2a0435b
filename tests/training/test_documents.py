"""Streamed document data (--data .txt / .jsonl / .parquet / a datasets folder): tokenised on the fly,
packed into lanes, each rank building only its own lanes; one process with accumulation and two
ranks see the same windows; resume continues exactly; the held-out split is the data's end.
The reference tokenises each document on its own with the tokenizer and packs by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.training.conftest import documents
from tli_kernels.training.data import TrainingData

SEQ, MICRO, LANES = 16, 2, 4
DOCS = documents(120, seed=1)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpora")
    paths = {"txt": str(root / "docs.txt"), "jsonl": str(root / "docs.jsonl"), "parquet": str(root / "docs.parquet"),
             "datasets": str(root / "ds")}  # fmt: skip
    with open(paths["txt"], "w") as f:
        f.writelines(d + "\n" for d in DOCS)
    with open(paths["jsonl"], "w") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    pq.write_table(pa.table({"text": DOCS}), paths["parquet"], row_group_size=25)  # several row groups
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(paths["datasets"])
    return paths


def _tokenizer(doc_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(doc_model)


def _open(tok, path, *, rank=0, world=1, heldout=0.1, eval_tokens=64):
    return TrainingData.open(tok, data_file=path, seq_len=SEQ, seed=0, eval_tokens=eval_tokens, global_batch=LANES,
                             vocab_size=len(tok) + 8, rank=rank, world=world, micro_batch=MICRO,
                             heldout_fraction=heldout)  # fmt: skip


def _reference_lanes(tok, kind: str, steps: int, heldout: float) -> list[list[np.ndarray]]:
    """windows[lane][step], packed by hand from per-document tokenisation."""
    if kind == "txt":
        lines = [d + "\n" for d in DOCS]
        starts = np.cumsum([0] + [len(s.encode()) for s in lines])[:-1]
        units = int(starts[-1] + len(lines[-1].encode()))
    elif kind == "jsonl":
        lines = [json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)]
        starts = np.cumsum([0] + [len(s.encode()) for s in lines])[:-1]
        units = int(starts[-1] + len(lines[-1].encode()))
    else:
        starts, units = np.arange(len(DOCS)), len(DOCS)
    train_units = int(units * (1 - heldout))
    if kind in ("txt", "jsonl"):  # the split moves to the next document start
        train_units = int(next((s for s in starts if s >= train_units), units))
    eos = [] if kind == "txt" else [tok.eos_token_id]
    texts = [d + "\n" for d in DOCS] if kind == "txt" else DOCS
    out = []
    for j in range(LANES):
        lo, hi = train_units * j // LANES, train_units * (j + 1) // LANES
        mine = [i for i, s in enumerate(starts) if lo <= s < hi]
        stream = []
        while len(stream) < (steps + 1) * SEQ:  # wraps around (epochs)
            for i in mine:
                stream += tok(texts[i], add_special_tokens=False)["input_ids"] + eos
        out.append([np.array(stream[s * SEQ : (s + 1) * SEQ]) for s in range(steps)])
    return out


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "datasets"])
def test_lanes_match_hand_packing_and_ranks_match_accumulation(doc_model, corpora, kind):
    tok = _tokenizer(doc_model)
    steps = 12  # more than a lane holds: each wraps at least once
    reference = _reference_lanes(tok, "rows" if kind in ("parquet", "datasets") else kind, steps, 0.1)
    one = _open(tok, corpora[kind])
    ranks = [_open(tok, corpora[kind], rank=r, world=2) for r in range(2)]
    assert sorted(ranks[0].stream.mine) == [0, 1] and sorted(ranks[1].stream.mine) == [2, 3]  # own lanes only
    for step in range(steps):
        accumulated = torch.cat([one.batch(step, m, micro_batch=MICRO, accum=2) for m in range(2)])
        distributed = torch.cat(
            [ranks[r].batch(step, 0, micro_batch=MICRO, accum=1, rank=r, world=2) for r in range(2)]
        )
        assert torch.equal(accumulated, distributed)
        expected = torch.from_numpy(np.stack([reference[j][step] for j in range(LANES)]))
        assert torch.equal(accumulated, expected), (kind, step)


def test_parquet_and_datasets_give_the_same_windows(doc_model, corpora):
    tok = _tokenizer(doc_model)
    a, b = _open(tok, corpora["parquet"]), _open(tok, corpora["datasets"])
    for step in range(5):
        for m in range(2):
            assert torch.equal(
                a.batch(step, m, micro_batch=MICRO, accum=2), b.batch(step, m, micro_batch=MICRO, accum=2)
            )
    assert torch.equal(a.heldout, b.heldout)


def test_resume_continues_every_lane_exactly(doc_model, corpora):
    tok = _tokenizer(doc_model)
    straight = _open(tok, corpora["jsonl"])
    first = _open(tok, corpora["jsonl"])
    for step in range(7):
        for m in range(2):
            want = straight.batch(step, m, micro_batch=MICRO, accum=2)
            assert torch.equal(first.batch(step, m, micro_batch=MICRO, accum=2), want)
    state = json.loads(json.dumps(first.state(7)))  # through JSON, as in a checkpoint
    for r in range(2):  # resumed on two ranks: each restores its own lanes
        again = _open(tok, corpora["jsonl"], rank=r, world=2)
        again.restore(state)
        for step in range(7, 10):
            got = again.batch(step, 0, micro_batch=MICRO, accum=1, rank=r, world=2)
            assert torch.equal(got, _window_rows(straight, step, r)), (r, step)


def _window_rows(data, step, rank):
    if not hasattr(data, "_cache"):
        data._cache = {}
    if step not in data._cache:
        data._cache[step] = torch.cat([data.batch(step, m, micro_batch=MICRO, accum=2) for m in range(2)])
    return data._cache[step][rank * MICRO : (rank + 1) * MICRO]


def test_heldout_is_the_recorded_end_of_the_data(doc_model, corpora):
    tok = _tokenizer(doc_model)
    data = _open(tok, corpora["parquet"], heldout=0.1, eval_tokens=64)
    assert data.split == {"unit": "rows", "units": 120, "train": [0, 108], "heldout": [108, 120],
                          "heldout_fraction": 0.1, "lanes": LANES}  # fmt: skip
    ids = []
    for d in DOCS[108:]:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.equal(data.heldout.reshape(-1), torch.tensor(ids[: data.heldout.numel()]))


def test_bad_documents_are_named(doc_model, tmp_path):
    tok = _tokenizer(doc_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n' * 20)
    with pytest.raises(ValueError, match=r"bad.jsonl: line at byte \d+ has no string field 'text'"):
        data = _open(tok, str(bad), heldout=0.5, eval_tokens=0)
        data.batch(0, 0, micro_batch=MICRO, accum=2)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown kind"):
        _open(tok, str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        _open(tok, str(tmp_path / "missing.jsonl"))


def test_tli_train_on_jsonl_records_the_split(doc_model, corpora, tmp_path):
    from tli_kernels.training.trainer import TrainConfig, train

    result = train(TrainConfig(model=doc_model, output=str(tmp_path / "o"), data_file=corpora["jsonl"], seq_len=SEQ,
                               micro_batch=MICRO, accum=2, steps=3, eval_tokens=64, eval_every=0, progress=False,
                               threads=1))  # fmt: skip
    training = json.load(open(os.path.join(result.checkpoint, "tli_training.json")))
    assert training["data_split"]["unit"] == "bytes" and training["data_split"]["heldout"][1] == os.path.getsize(
        corpora["jsonl"]
    )
    assert len(result.evals) == 2 and all(np.isfinite(e["heldout_loss"]) for e in result.evals)
