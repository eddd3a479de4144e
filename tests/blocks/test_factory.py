import pytest

from gcnet.blocks import CONTEXT_BLOCKS, GlobalContext, NonLocal, SimplifiedNonLocal, SqueezeExcite, get_context_block


def test_names_build_their_blocks_with_options() -> None:
    assert get_context_block(None) is None
    gc = get_context_block("gc", reduction=4)(64)
    assert type(gc) is GlobalContext and gc.reduction == 4 and gc.fusion == "add"
    assert type(get_context_block("snl")(64)) is SimplifiedNonLocal
    assert type(get_context_block("se")(64)) is SqueezeExcite
    nl = get_context_block("nl", mode="dot_product", dims=3)(64)
    assert type(nl) is NonLocal and nl.mode == "dot_product" and nl.dims == 3
    assert sorted(CONTEXT_BLOCKS) == ["gc", "nl", "se", "snl"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown block 'gcb'; expected one of \['gc', 'nl', 'se', 'snl'\]"):
        get_context_block("gcb")


def test_misspelt_option_fails_at_configuration_time() -> None:
    with pytest.raises(TypeError, match=r"block 'gc' got unknown options \['ratio'\]; expected some of \['reduction', 'pooling'"):
        get_context_block("gc", ratio=16)
    with pytest.raises(TypeError, match=r"block 'se' got unknown options \['pooling'\]"):
        get_context_block("se", pooling="attention")
