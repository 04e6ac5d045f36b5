"""`ndopt passes [NAME]` (ndopt.passinfo): the pass list, one pass's documentation, a clear error."""

from __future__ import annotations

from typing import Literal

import pytest
from click.testing import CliRunner

from ndopt.cli import main
from ndopt.passinfo import config_fields, describe, type_name
from ndopt.passmanager import available_passes

PASSES = available_passes()
BUILT_IN = {"aimet_quantization", "block_importance", "block_pruning", "cfg_folding", "dead_component_elimination",
            "decoder_swap", "encoder_substitution", "schedule_folding", "step_distillation"}


def test_list_has_every_pass_with_its_summary():
    res = CliRunner().invoke(main, ["passes"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines() if line and not line.startswith("`")}
    assert set(lines) == set(PASSES) and set(PASSES) >= BUILT_IN  # a built-in that fails to load fails here
    assert "Drop the least important MMDiT blocks" in lines["block_pruning"]
    assert "`ndopt passes NAME`" in res.output


def test_one_pass_shows_its_facts_and_every_config_key():
    res = CliRunner().invoke(main, ["passes", "block_pruning"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "requires:    block_importance (from block_importance)" in out
    assert "provides:    -" in out and "invalidates: block_importance" in out
    assert "lossy: latent_psnr" in out and ">= 12 dB, its worst frame >= 10 dB" in out
    # nested configs under dotted keys, with type, constraint, default and description
    assert "  keep: int (>= 1) = 18\n      blocks to keep" in out
    assert "  data.clips: int (>= 1) = 512\n      clips encoded once" in out
    assert "  stage1.lr_schedule: \"constant\" | \"cosine\" = \"cosine\"" in out
    assert "  evaluate_steps: list[int] | null = null" in out
    assert "config: none" in describe("schedule_folding")


def test_unknown_pass_is_a_one_line_error_naming_the_passes():
    res = CliRunner().invoke(main, ["passes", "block_prunning"])
    assert res.exit_code == 2
    assert res.stderr.startswith("ndopt: error: unknown pass 'block_prunning'; available: ")
    assert all(name in res.stderr for name in PASSES) and res.stderr.count("\n") == 1


@pytest.mark.parametrize("name", sorted(BUILT_IN | set(PASSES)))
def test_every_config_key_is_documented(name):
    """What `ndopt passes NAME` prints is the recipe's whole surface: no key without a description,
    and every list item's model (`overrides[].pattern`) is reached."""
    fields = config_fields(PASSES[name].Config)
    assert [f.key for f in fields if not f.description] == []
    assert all(f.key in describe(name) for f in fields)


def test_type_names_read_as_recipes_write_them():
    assert type_name(Literal["w8a16", "w4a16"] | None) == '"w8a16" | "w4a16" | null'
    assert type_name(dict[str, list[int]]) == "dict[str, list[int]]"
    keys = [f.key for f in config_fields(PASSES["aimet_quantization"].Config)]
    assert "overrides[].pattern" in keys and "calibration.prompts" in keys
