"""Parsing and matching fleet selectors."""

from __future__ import annotations

from dataclasses import replace

import pytest

from twin.errors import InvalidArgument, SelectorError
from twin.selectors import Op, Selector, Space, Subject, Term, matches, parse_selector

LAMP = Subject(
    id="lamp-0001",
    kind="lamp",
    model="lamp-led-dimmable",
    state="active",
    serial="SN-1",
    site="pole-17",
    labels={"district": "north", "street": "Main Street", "tier": "1"},
    desired={"brightness": 80, "power": True},
    reported={
        "brightness": 60,
        "power": True,
        "temperature": 40.0,
        "name": "north 1",
        "firmware": {"version": "2.1.0", "build": 7},
        "list": [1, 2],
        "empty": {},
        "flag": False,
        "code": "40",
    },
    has_delta=True,
)
ATTRIBUTES_ONLY = replace(LAMP, desired=None, reported=None, has_delta=None)


def sel(text: str) -> Selector:
    return parse_selector(text)


# --- parsing ---------------------------------------------------------------------------------


def test_empty_selector_matches_everything() -> None:
    for text in ["", "   ", "\t\n"]:
        selector = sel(text)
        assert selector == Selector(())
        assert str(selector) == ""
        assert matches(selector, ATTRIBUTES_ONLY)
        assert not selector.uses_twin_values


@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("kind=lamp", Term(Space.ATTRIBUTE, "kind", Op.EQ, ("lamp",))),
        ("kind==LAMP", Term(Space.ATTRIBUTE, "kind", Op.EQ, ("lamp",))),
        ("  kind = Camera ", Term(Space.ATTRIBUTE, "kind", Op.EQ, ("camera",))),
        ("state!=Active", Term(Space.ATTRIBUTE, "state", Op.NE, ("active",))),
        ("id=lamp-0001", Term(Space.ATTRIBUTE, "id", Op.EQ, ("lamp-0001",))),
        ("model=lamp-led-dimmable", Term(Space.ATTRIBUTE, "model", Op.EQ, ("lamp-led-dimmable",))),
        ("serial=SN-1", Term(Space.ATTRIBUTE, "serial", Op.EQ, ("SN-1",))),
        ('site=""', Term(Space.ATTRIBUTE, "site", Op.EQ, ("",))),
        ("district=north", Term(Space.LABEL, "district", Op.EQ, ("north",))),
        ("labels.district=north", Term(Space.LABEL, "district", Op.EQ, ("north",))),
        ("labels.kind=x", Term(Space.LABEL, "kind", Op.EQ, ("x",))),
        ("district", Term(Space.LABEL, "district", Op.EXISTS)),
        ("!district", Term(Space.LABEL, "district", Op.NOT_EXISTS)),
        ("! district", Term(Space.LABEL, "district", Op.NOT_EXISTS)),
        (
            "district in (north, south)",
            Term(Space.LABEL, "district", Op.IN, ("north", "south")),
        ),
        ("district in(north)", Term(Space.LABEL, "district", Op.IN, ("north",))),
        (
            'street notin ("Main Street","a,b")',
            Term(Space.LABEL, "street", Op.NOTIN, ("Main Street", "a,b")),
        ),
        (
            "kind in (LAMP,sensor)",
            Term(Space.ATTRIBUTE, "kind", Op.IN, ("lamp", "sensor")),
        ),
        (
            "firmware.version!=2.1.0",
            Term(Space.REPORTED, "firmware.version", Op.NE, ("2.1.0",)),
        ),
        (
            "reported.firmware.version=2.1.0",
            Term(Space.REPORTED, "firmware.version", Op.EQ, ("2.1.0",)),
        ),
        ("desired.brightness>=50", Term(Space.DESIRED, "brightness", Op.GE, ("50",))),
        ("reported.brightness<-1.5e2", Term(Space.REPORTED, "brightness", Op.LT, ("-1.5e2",))),
        ("reported.a<=.5", Term(Space.REPORTED, "a", Op.LE, (".5",))),
        ("reported.a>3", Term(Space.REPORTED, "a", Op.GT, ("3",))),
        ("reported.power", Term(Space.REPORTED, "power", Op.EXISTS)),
        ("!desired.power", Term(Space.DESIRED, "power", Op.NOT_EXISTS)),
        ("has_delta=true", Term(Space.HAS_DELTA, "has_delta", Op.EQ, ("true",))),
        ("has_delta==FALSE", Term(Space.HAS_DELTA, "has_delta", Op.EQ, ("false",))),
        ('street="Main Street"', Term(Space.LABEL, "street", Op.EQ, ("Main Street",))),
        (r'x="a\"b\\c"', Term(Space.LABEL, "x", Op.EQ, ('a"b\\c',))),
        ('x="=!<>()"', Term(Space.LABEL, "x", Op.EQ, ("=!<>()",))),
        ("x=ünïcode", Term(Space.LABEL, "x", Op.EQ, ("ünïcode",))),
        ("in=x", Term(Space.LABEL, "in", Op.EQ, ("x",))),
        ("notin notin (x)", Term(Space.LABEL, "notin", Op.NOTIN, ("x",))),
        ("a-b_c.x-y=1", Term(Space.REPORTED, "a-b_c.x-y", Op.EQ, ("1",))),
    ],
)
def test_parse_single_term(text: str, term: Term) -> None:
    selector = sel(text)
    assert selector.terms == (term,)
    assert sel(str(selector)) == selector


@pytest.mark.parametrize(
    "text",
    [
        "kind=lamp,district=north,firmware.version!=2.1.0",
        'street in ("Main Street", "x,y"), !tier, reported.temperature>39.5',
        'labels.site="pole 17",labels.has_delta=x,labels.reported',
        'x="",y="a\\\\b",z=" lead"',
        "has_delta=false,desired.power=true",
    ],
)
def test_str_round_trips(text: str) -> None:
    selector = sel(text)
    assert sel(str(selector)) == selector
    assert str(sel(str(selector))) == str(selector)


def test_canonical_text() -> None:
    assert str(sel(" kind == LAMP , firmware.version != 2.1.0 ")) == (
        "kind=lamp,reported.firmware.version!=2.1.0"
    )
    assert str(sel('street in ( "Main Street" , x )')) == 'street in ("Main Street",x)'
    assert str(sel("labels.site=a")) == "labels.site=a"
    assert str(sel("labels.district=a")) == "district=a"


def test_terms_split_only_outside_parentheses_and_quotes() -> None:
    selector = sel('a in (1,2),b="x,y",c')
    assert [t.field for t in selector.terms] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "kind=bus",
            "selector term 'kind=bus': unknown kind 'bus' (expected lamp, sensor or camera)",
        ),
        ("kind in (lamp,bus)", "unknown kind 'bus'"),
        ("state=broken", "unknown state 'broken'"),
        ("a,,b", "empty term"),
        ("a,", "empty term"),
        (",a", "empty term"),
        ("a=(", "unbalanced '('"),
        ("a=)", "unbalanced ')'"),
        ('a="x', "unterminated quoted value"),
        ('a="x"y', "unexpected text after a quoted value"),
        ("Kind=x", "'Kind' is not a valid label key"),
        ("-a=x", "not a valid label key"),
        ("a-=x", "not a valid label key"),
        ("labels.a.b=x", "not a valid label key"),
        (f"{'a' * 64}=x", "not a valid label key"),
        ("labels.=x", "not a valid label key"),
        ("labels=x", "'labels' needs a key"),
        ("reported=x", "'reported' needs a key"),
        ("desired", "'desired' needs a key"),
        ("reported.=x", "empty member name"),
        ("reported..x=1", "empty member name"),
        ("a..b=1", "empty member name"),
        ("a.=1", "empty member name"),
        ("reported.a[0]=1", "array elements cannot be selected"),
        (f"reported.{'m' * 129}=1", "at most 128"),
        ("id", "always exists"),
        ("!kind", "always exists"),
        ("x<4", "works only on twin values"),
        ("kind>=4", "works only on twin values"),
        ("reported.x<abc", "'abc' is not a number"),
        ("reported.x<1e999", "not a number"),
        ("reported.x<nan", "not a number"),
        ("reported.x in (1", "unbalanced"),
        ("has_delta!=true", "has_delta takes only"),
        ("has_delta=yes", "has_delta takes only"),
        ("has_delta", "has_delta takes only"),
        ("has_delta in (true)", "has_delta takes only"),
        ("a=b c", "put it in double quotes"),
        ("a=b=c", "put it in double quotes"),
        ("a=", "missing value"),
        ("a!=", "missing value"),
        ("a in ()", "missing value"),
        ("a in (x,)", "missing value"),
        ("a in (x,(y))", "put it in double quotes"),
        ("a in x", "expected =, ==, !=, <, <=, >, >=, in (...) or notin (...)"),
        ("a ~ x", "expected =, =="),
        ("a in (x) y", "expected =, =="),
        ("a b", "expected =, =="),
        ("=x", "expected a key"),
        ('"a"=x', "expected a key"),
        ("!a=b", "'!' must be followed by a key alone"),
        ("!", "'!' must be followed by a key alone"),
        ("a=\x00", "control character"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector(text)
    assert fragment in str(info.value)
    assert isinstance(info.value, InvalidArgument)


def test_errors_quote_the_offending_term() -> None:
    with pytest.raises(SelectorError, match=r"^selector term 'district=north x': "):
        parse_selector("kind=lamp, district=north x ,site=a")


def test_length_limit() -> None:
    ok = "a=" + "x" * 1022
    assert len(ok) == 1024
    assert parse_selector(ok).terms[0].values == ("x" * 1022,)
    with pytest.raises(SelectorError, match="1025 characters long; the limit is 1024"):
        parse_selector(ok + "x")


def test_term_limit() -> None:
    assert len(parse_selector(",".join(f"l{i}=x" for i in range(32))).terms) == 32
    with pytest.raises(SelectorError, match="33 terms; the limit is 32"):
        parse_selector(",".join(f"l{i}=x" for i in range(33)))


def test_max_label_key_length_accepted() -> None:
    assert parse_selector(f"{'a' * 63}=x").terms[0].field == "a" * 63


# --- selector properties ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "uses"),
    [
        ("kind=lamp,district=north", False),
        ("firmware.version=1", True),
        ("reported.x", True),
        ("!desired.x", True),
        ("has_delta=true", True),
        ("labels.reported=x", False),
    ],
)
def test_uses_twin_values(text: str, uses: bool) -> None:
    assert sel(text).uses_twin_values is uses


def test_combine() -> None:
    query = sel("kind=lamp,reported.brightness>50")
    scope = sel("district=north,kind=lamp")
    combined = query.combine(scope)
    assert str(combined) == "kind=lamp,reported.brightness>50,district=north"
    assert combined.uses_twin_values
    assert query.combine(Selector()) == query
    assert Selector().combine(scope) == scope
    assert matches(combined, LAMP)
    assert not matches(combined, replace(LAMP, labels={"district": "south"}))


def test_exact_attributes() -> None:
    selector = sel(
        "kind=LAMP,state=active,model=m,serial=S,id=i,site=pole,district=north,"
        "kind!=camera,reported.x=1,model in (a,b)"
    )
    assert selector.exact_attributes() == {
        "kind": "lamp",
        "state": "active",
        "model": "m",
        "serial": "S",
        "id": "i",
    }
    assert sel("").exact_attributes() == {}
    contradiction = sel("kind=lamp,kind=camera").exact_attributes()
    assert contradiction["kind"] in ("lamp", "camera")
    assert not matches(sel("kind=lamp,kind=camera"), LAMP)


def test_selector_is_hashable_and_comparable() -> None:
    assert hash(sel("a=1,b")) == hash(sel("a = 1 , b"))
    assert sel("a=1") != sel("a!=1")


# --- matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind=lamp", True),
        ("kind=LAMP", True),
        ("kind!=lamp", False),
        ("kind in (sensor,camera)", False),
        ("kind notin (sensor,camera)", True),
        ("state=active", True),
        ("id=lamp-0001", True),
        ("id=lamp-0002", False),
        ("model=lamp-led-dimmable", True),
        ("serial=SN-1", True),
        ("serial=sn-1", False),
        ("site=pole-17", True),
        ('site=""', False),
        ("district=north", True),
        ("district=North", False),
        ("district!=north", False),
        ("district!=south", True),
        ("district in (south,north)", True),
        ("district notin (south,north)", False),
        ("district", True),
        ("!district", False),
        ("zone", False),
        ("!zone", True),
        ("zone=a", False),
        ("zone!=a", True),
        ("zone in (a)", False),
        ("zone notin (a)", True),
        ('street="Main Street"', True),
        ("tier=1", True),
        ("labels.tier in (1,2)", True),
        ("kind=lamp,district=north,tier=1", True),
        ("kind=lamp,district=south", False),
    ],
)
def test_match_attributes_and_labels(text: str, expected: bool) -> None:
    assert matches(sel(text), ATTRIBUTES_ONLY) is expected


def test_match_attribute_case_of_subject_kind() -> None:
    assert matches(sel("kind=lamp,state=active"), replace(LAMP, kind="LAMP", state="Active"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("firmware.version=2.1.0", True),
        ("firmware.version!=2.1.0", False),
        ("firmware.version!=2.2.0", True),
        ("firmware.version in (2.0.0,2.1.0)", True),
        ("firmware.version notin (2.0.0,2.1.0)", False),
        ("reported.firmware.build=7", True),
        ("reported.firmware.build=7.0", True),
        ('reported.firmware.build="7"', True),
        ("reported.temperature=40", True),
        ("reported.temperature=40.0", True),
        ("reported.temperature=4e1", True),
        ("reported.temperature=40.5", False),
        ("reported.temperature!=40", False),
        ("reported.code=40", True),
        ("reported.code=40.0", False),
        ('reported.name="north 1"', True),
        ("reported.power=true", True),
        ("reported.power=TRUE", False),
        ("reported.power=1", False),
        ("reported.power=false", False),
        ("reported.power!=false", True),
        ("reported.flag=false", True),
        ("reported.flag=0", False),
        ("reported.brightness=true", False),
        ('reported.list="[1,2]"', False),
        ("reported.empty={}", False),
        ("reported.list!=x", True),
        ("reported.firmware=x", False),
        ("reported.missing=x", False),
        ("reported.missing!=x", True),
        ("reported.missing notin (x)", True),
        ("reported.firmware.version.major=2", False),
        ("reported.firmware.version.major!=2", True),
        ("reported.brightness>50", True),
        ("reported.brightness>60", False),
        ("reported.brightness>=60", True),
        ("reported.brightness<60.5", True),
        ("reported.brightness<=59.9", False),
        ("reported.brightness<1e3", True),
        ("reported.temperature>39.99", True),
        ("reported.code>1", False),
        ("reported.power>0", False),
        ("reported.list>0", False),
        ("reported.missing<1", False),
        ("reported.missing>=-1", False),
        ("desired.brightness=80", True),
        ("desired.brightness>70", True),
        ("desired.temperature", False),
        ("!desired.temperature", True),
        ("reported.temperature", True),
        ("reported.empty", True),
        ("reported.firmware", True),
        ("reported.firmware.version", True),
        ("!reported.firmware.version", False),
        ("reported.list.x", False),
        ("has_delta=true", True),
        ("has_delta=false", False),
        ("kind=lamp,firmware.version!=2.2.0,has_delta=true", True),
    ],
)
def test_match_twin_values(text: str, expected: bool) -> None:
    assert matches(sel(text), LAMP) is expected


def test_match_big_integers_exactly() -> None:
    subject = replace(LAMP, reported={"n": 2**53 + 1})
    assert matches(sel(f"reported.n={2**53 + 1}"), subject)
    assert not matches(sel(f"reported.n={2**53}"), subject)
    assert matches(sel(f"reported.n>{2**53}"), subject)


@pytest.mark.parametrize(
    "text", ["reported.brightness=1", "!reported.x", "desired.x", "has_delta=false"]
)
def test_twin_terms_need_the_twin(text: str) -> None:
    with pytest.raises(ValueError, match="needs the subject"):
        matches(sel(text), ATTRIBUTES_ONLY)


def test_only_the_needed_twin_part_is_required() -> None:
    reported_only = replace(ATTRIBUTES_ONLY, reported={"a": 1})
    assert matches(sel("reported.a=1"), reported_only)
    with pytest.raises(ValueError):
        matches(sel("desired.a=1"), reported_only)


def test_matching_stops_at_first_failing_term() -> None:
    # The attribute term fails first, so the twin is never consulted.
    assert not matches(sel("kind=camera,reported.x=1"), ATTRIBUTES_ONLY)
