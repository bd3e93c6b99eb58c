"""The GPU catalogue and selection table (package data) are complete and consistent."""

from __future__ import annotations

import gguf
import pytest

from deployer.catalogue import load_catalogue
from deployer.quants import FILE_TYPES, KV_CACHE_BLOCKS, is_quantized

B = 1_000_000_000


def test_quant_table_matches_the_gguf_package():
    known = {t.name.removeprefix("MOSTLY_").removeprefix("ALL_"): t.value for t in gguf.LlamaFileType}
    for name, value in FILE_TYPES.items():
        assert known.get(name) == value, name


def test_kv_cache_blocks_match_the_gguf_package():
    for name, geometry in KV_CACHE_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == geometry, name


@pytest.mark.parametrize(
    "params",
    [
        0,
        500_000_000,
        3 * B - 1,
        3 * B,
        7 * B - 1,
        7 * B,
        13 * B - 1,
        13 * B,
        30 * B - 1,
        30 * B,
        70 * B,
        70 * B + 1,
        10**13,
    ],
)
@pytest.mark.parametrize("quantized", [True, False])
def test_every_model_lands_on_exactly_one_row(params, quantized):
    catalogue = load_catalogue()
    rows = [row for row in catalogue.selection if row.matches(params, quantized)]
    assert len(rows) == 1, (params, quantized, rows)


@pytest.mark.parametrize(
    ("params", "quant", "gpu"),
    [
        pytest.param(500_000_000, "Q8_0", "L4", id="0.5b-any-L4"),
        pytest.param(5 * B, "F16", "A10", id="5b-any-A10"),
        pytest.param(8 * B, "Q4_K_M", "L40S", id="8b-any-L40S"),
        pytest.param(int(18.4 * B), "Q8_0", "H100", id="18b-quantized-H100"),
        pytest.param(20 * B, "BF16", "A100-80GB", id="20b-unquantized-A100-80GB"),
        pytest.param(70 * B, "F16", "H100", id="70b-unquantized-H100"),
        pytest.param(70 * B, "Q4_K_M", "H100", id="70b-quantized-H100"),
        pytest.param(123 * B, "Q4_K_M", "H100", id="123b-quantized-H100"),
        pytest.param(123 * B, "F16", "B200", id="123b-unquantized-B200"),
    ],
)
def test_selection_rows(params, quant, gpu):
    assert load_catalogue().row_for(params, is_quantized(quant)).gpu == gpu


def test_usable_fraction_is_the_one_the_row_gives():
    expected = {"L4": 0.70, "A10": 0.75, "L40S": 0.75, "A100-80GB": 0.80, "H100": 0.85, "H200": 0.95, "B200": 0.95}
    gpus = load_catalogue().gpus
    assert {name: gpus[name].usable_fraction for name in expected} == expected


def test_prices_as_published():
    prices = {name: gpu.usd_per_hour for name, gpu in load_catalogue().gpus.items()}
    assert prices == {
        "B200": 6.25, "H200": 4.54, "H100": 3.95, "A100-80GB": 2.50, "A100-40GB": 2.10,
        "L40S": 1.95, "A10": 1.10, "L4": 0.80, "T4": 0.59,
    }  # fmt: skip


def test_escalation_ladder_grows_in_usable_memory():
    # L4 and A10 both carry 24 GB; the A10's row lets a plan fill more of it (75 % vs 70 %)
    catalogue = load_catalogue()
    usable = [catalogue.gpus[name].usable_bytes for name in catalogue.escalation]
    assert usable == sorted(usable)
    assert len(set(usable)) == len(usable)


def test_gpu_names_are_accepted_by_modal():
    from modal._utils.function_utils import parse_gpu_config

    catalogue = load_catalogue()
    for spelling in catalogue.spellings():
        gpu = catalogue.gpus[catalogue.canonical(spelling)]
        config = parse_gpu_config(f"{spelling}:{gpu.max_count}")
        assert config.gpu_type == spelling.upper()
        assert config.count == gpu.max_count
