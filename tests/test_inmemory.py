"""upscale_model on a model in memory equals tli upscale on its folder loaded by stock transformers
(same dtype): the same weights bit for bit and the same logits, for every method."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import save_tiny_llama
from tli_kernels import upscale_model
from tli_kernels.upscale import upscale

CASES = [
    ("tli", {"k": 2, "init": "copy", "alpha": 0.5}),
    ("tli", {"k": 2, "init": "average", "alpha": 0.3}),
    ("tli", {"k": 3, "init": "random"}),
    ("dus", {"m": 1}),
    ("stack", {"times": 2}),
    ("passthrough", {"layers": "0,0-3"}),
    ("block-expansion", {"k": 2}),
    ("moe-upcycle", {"experts": 2, "top_k": 1}),
]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def source(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("src") / "m")
    return save_tiny_llama(path, layers=4, dtype=request.param, tie=True), request.param


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values()))}" for m, o in CASES])
def test_upscale_model_equals_the_disk_output(source, tmp_path, method, options):
    from transformers import AutoModelForCausalLM

    src, dtype = source
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    big = upscale_model(model, method, **options)
    upscale(src, str(tmp_path / "out"), method, options=options)
    disk = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=dtype).eval()

    assert type(big) is type(disk) and big.config.num_hidden_layers == disk.config.num_hidden_layers
    a, b = big.state_dict(), disk.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(big(input_ids=x).logits, disk(input_ids=x).logits, rtol=0, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    assert big.tli_provenance["method"] == method


def test_upscale_model_refuses_what_the_disk_path_refuses(source):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source[0])
    with pytest.raises(ValueError, match="--k 9"):
        upscale_model(model, "tli", k=9)
    with pytest.raises(ValueError, match="--method 'nope'"):
        upscale_model(model, "nope")


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "gpt_neox", "qwen3_moe", "olmo2"])
def test_upscale_model_for_other_families(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from tests.architectures.models import FAMILIES, build_model, save_model

    model = build_model(FAMILIES[model_type])
    src = save_model(model, str(tmp_path / "src"))
    options = {"k": 2, "init": "copy", "alpha": 0.375}
    big = upscale_model(model, "tli", **options)
    upscale(src, str(tmp_path / "out"), "tli", options=options)
    disk = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    a, b = big.state_dict(), disk.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
