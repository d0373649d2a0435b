"""Layer kinds said by a config rule (tli_kernels/architectures/layer_kinds.py): exactly the patterns the
rule can express are accepted, with the entries transformers reads back as the same kinds; any other is
refused in one line naming the first layer that breaks it and a map that works."""

from __future__ import annotations

import itertools

import pytest

from tli_kernels.architectures.layer_kinds import layout_config, ranges


def _kinds_from(rule: str, config: dict, n: int) -> list[bool]:
    """The layer kinds transformers builds from the entries (its modeling code's conditions)."""
    if rule == "first_k_dense_replace":
        return [i >= config["first_k_dense_replace"] for i in range(n)]
    start, end, every = config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]
    return [(i + 1) % every == 0 and start <= i <= end for i in range(n)]


@pytest.mark.parametrize("rule", ["first_k_dense_replace", "moe_layer_range"])
def test_every_pattern_is_expressed_exactly_or_refused_with_a_map_that_works(rule):
    for n in range(1, 8):
        for kinds in itertools.product([False, True], repeat=n):
            origin = list(range(n))
            is_moe = kinds.__getitem__
            try:
                config = layout_config(rule, "m", origin, is_moe)
            except ValueError as e:
                message = str(e)
                assert "\n" not in message and "cannot express" in message
                keep = [int(x) for part in message.rsplit("--layers ", 1)[1].split(",") for x in _expand(part)]
                good = layout_config(rule, "m", keep, is_moe)
                assert _kinds_from(rule, good, len(keep)) == [is_moe(i) for i in keep]
                continue
            assert _kinds_from(rule, config, n) == list(kinds), (kinds, config)


def _expand(part: str) -> list[int]:
    a, _, b = part.partition("-")
    return list(range(int(a), int(b or a) + 1))


def test_first_k_dense_names_the_first_layer_that_breaks_the_pattern():
    is_moe = {0: False, 1: True, 2: True}.__getitem__
    assert layout_config("first_k_dense_replace", "glm4_moe", [0, 0, 1, 2, 1], is_moe) == {"first_k_dense_replace": 2}
    with pytest.raises(
        ValueError, match=r"output layer 3 would be a dense layer \(source layer 0\).*--layers 0-2,1-2$"
    ):
        layout_config("first_k_dense_replace", "glm4_moe", [0, 1, 2, 0, 1, 2], is_moe)


def test_ranges():
    assert ranges([0, 1, 2, 1, 2, 5]) == "0-2,1-2,5"
    assert ranges([]) == ""
