"""Layouts: which block kind sits at which depth, the compact spec, and validation."""
import pytest

from flexdit.errors import FlexDiTError
from flexdit.models.layout import Layout


def raises(fn, match: str):
    """Assert a one-line FlexDiTError whose message contains `match`."""
    with pytest.raises(FlexDiTError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


# --- the compact spec ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec, depth, sdtms", [
    ("2+4x1-3-1-1+2", 28, 4),  # the paper's FlexDiT-XL
    ("2+2x1-2-1-1+0", 12, 2),  # our S/B default
    ("2+4x1-2-1-1+2", 24, 4),  # our L default
])
def test_spec_round_trip(spec, depth, sdtms):
    layout = Layout.parse(spec)
    assert len(layout) == depth and layout.num_sdtms == sdtms
    assert str(layout) == spec
    assert Layout.parse(str(layout), depth) == layout


def test_spec_reads_in_order():
    # P + S x [gen, sparse, recover, dense] + top
    layout = Layout.parse("1+2x1-2-1-1+3")
    assert layout.kinds == ("pool",
                            "gen", "sparse", "sparse", "recover", "dense",
                            "gen", "sparse", "sparse", "recover", "dense",
                            "dense", "dense", "dense")


def test_spec_ignores_spaces():
    assert Layout.parse(" 2 + 4x1-3-1-1 + 2 ") == Layout.parse("2+4x1-3-1-1+2")


def test_paper_layout_matches_constructor():
    assert Layout.parse("2+4x1-3-1-1+2") == Layout.flexdit(pool=2, sdtms=4, gen=1, sparse=3, recover=1, dense=1, top=2)


@pytest.mark.parametrize("depth, spec", [(28, "2+4x1-3-1-1+2"), (24, "2+4x1-2-1-1+2"), (12, "2+2x1-2-1-1+0")])
def test_default_layouts(depth, spec):
    layout = Layout.default_flexdit(depth)
    assert len(layout) == depth and str(layout) == spec
    assert Layout.parse("default", depth) == layout


def test_no_default_for_other_depths():
    raises(lambda: Layout.default_flexdit(7), "no default FlexDiT layout for depth 7")
    raises(lambda: Layout.parse("default", 7), "no default FlexDiT layout for depth 7")


def test_comma_list_form():
    layout = Layout.parse("pool,gen,sparse,recover,dense")
    assert layout.kinds == ("pool", "gen", "sparse", "recover", "dense")
    assert layout.num_sdtms == 1 and layout.has_sparse_tokens and not layout.is_dense


def test_single_kind_form():
    assert Layout.parse("pool").kinds == ("pool",)


def test_dense_layout():
    layout = Layout.dense(5)
    assert layout.is_dense and not layout.has_sparse_tokens and layout.num_sdtms == 0
    assert Layout.parse("dense", 5) == layout


def test_pooling_makes_layout_non_dense():
    # A pool block has no Q/K: a layout with one is not the plain DiT even without SDTMs.
    layout = Layout.parse("pool,dense")
    assert not layout.is_dense and not layout.has_sparse_tokens


def test_only_pool_blocks_stringify():
    layout = Layout(("pool",) * 3)
    assert str(layout) == "pool,pool,pool"
    assert Layout.parse(str(layout)) == layout


@pytest.mark.parametrize("kinds", [
    ("pool", "dense"),
    ("gen", "gen", "sparse", "recover"),
    ("pool", "gen", "recover", "dense", "gen", "sparse", "recover"),  # SDTMs of different shapes
])
def test_str_parses_back_to_same_layout(kinds):
    layout = Layout(kinds)
    assert Layout.parse(str(layout), len(layout)) == layout


@pytest.mark.parametrize("kinds", [
    ("dense", "gen", "recover"),  # a dense block below the first SDTM
    ("pool", "dense", "gen", "sparse", "recover", "dense"),
    ("gen", "recover", "pool", "gen", "recover", "pool"),  # pool blocks after SDTMs
])
def test_str_of_non_canonical_layout_parses_back_to_same_layout(kinds):
    # str() may only use the compact spec when the spec rebuilds exactly this layout; a printed layout
    # (error messages, reports, --layout) must mean the layout it came from.
    layout = Layout(kinds)
    assert Layout.parse(str(layout), len(layout)) == layout, f"str() printed {str(layout)!r}"


def test_str_of_dense_layout_parses_back():
    # The printed form of a dense layout should be accepted by parse (e.g. copied into --layout).
    layout = Layout.dense(3)
    assert Layout.parse(str(layout), 3) == layout, f"str() printed {str(layout)!r}"


# --- validation ----------------------------------------------------------------------------------
def test_error_sparse_before_gen():
    raises(lambda: Layout(("pool", "sparse", "recover")), "'sparse' needs sparse tokens")


def test_error_recover_before_gen():
    raises(lambda: Layout(("dense", "recover")), "'recover' needs sparse tokens")


@pytest.mark.parametrize("kind", ["dense", "pool"])
def test_error_dense_tokens_inside_sdtm(kind):
    raises(lambda: Layout(("gen", kind, "recover")), "close it with 'recover'")


def test_error_ending_inside_sdtm():
    raises(lambda: Layout(("pool", "gen", "sparse")), "ends inside an SDTM")
    raises(lambda: Layout.parse("2+1x1-3-0-0+0"), "ends inside an SDTM")  # a spec without recover


def test_error_new_gen_before_recover():
    raises(lambda: Layout(("gen", "sparse", "gen", "recover")), "before the previous one recovered")


def test_consecutive_gen_blocks_are_one_sdtm():
    # Several generation blocks in a row all cross-attend to the same dense input: valid.
    assert Layout(("gen", "gen", "recover")).num_sdtms == 1


def test_error_unknown_kind():
    raises(lambda: Layout.parse("pool,attention,dense"), "unknown block kind 'attention'")


def test_error_unreadable_spec():
    raises(lambda: Layout.parse("2+4x1-3-1+2"), "cannot read layout")


def test_error_empty_layout():
    raises(lambda: Layout(()), "at least one block")


def test_error_depth_mismatch():
    raises(lambda: Layout.parse("2+4x1-3-1-1+2", 12), "has 28 blocks but the model has 12")
    raises(lambda: Layout.parse("pool,gen,recover", 4), "has 3 blocks but the model has 4")


def test_error_named_layout_needs_depth():
    raises(lambda: Layout.parse("dense"), "needs the model depth")
