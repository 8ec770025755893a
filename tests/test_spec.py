"""Tests for imgsvc.spec: canonical render queries, rejections, presets and format negotiation."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from imgsvc.errors import InvalidParameter
from imgsvc.spec import (
    DEFAULT_PRESETS,
    AcceptToken,
    OutputFormat,
    ParsedQuery,
    RequestedFormat,
    SignatureParams,
    SourceFormat,
    SpecLimits,
    TransformSpec,
    accept_token,
    choose_output_format,
    format_presets,
    parse_presets,
    parse_query,
    varies_on_accept,
)


def parse(qs: str, limits: SpecLimits | None = None) -> ParsedQuery:
    items = parse_qsl(qs, keep_blank_values=True)
    return parse_query(items) if limits is None else parse_query(items, limits)


def canonical(qs: str) -> str:
    return parse(qs).spec.canonical_query()


@pytest.mark.parametrize(
    ("qs", "expected"),
    [
        ("", ""),
        ("w=100", "w=100"),
        ("h=50", "h=50"),
        ("w=64&h=64&fit=cover", "fit=cover&h=64&w=64"),
        ("fit=contain&w=10&h=20&bg=000", "bg=000000&fit=contain&h=20&w=10"),
        ("w=10&h=20&fit=cover&g=smart", "fit=cover&g=smart&h=20&w=10"),
        ("w=10&h=20&fit=cover&g=entropy", "fit=cover&g=entropy&h=20&w=10"),
        ("w=10&h=20&fit=contain&g=ne", "fit=contain&g=ne&h=20&w=10"),
        ("w=10&h=20&fit=fill", "fit=fill&h=20&w=10"),
        ("w=10&h=20&fit=outside", "fit=outside&h=20&w=10"),
        ("fmt=webp", "fmt=webp"),
        ("fmt=auto&w=300", "fmt=auto&w=300"),
        ("fmt=avif&q=60", "fmt=avif&q=60"),
        ("q=80", "q=80"),  # no explicit format: the default of the eventual format is unknown
        ("fmt=auto&q=80", "fmt=auto&q=80"),
        ("blur=2", "blur=2"),
        ("blur=2.50", "blur=2.5"),
        ("blur=0.5", "blur=0.5"),
        ("blur=0.333", "blur=0.33"),
        ("blur=100", "blur=100"),
        ("blur=0.3", "blur=0.3"),
        ("bg=1A2B3C", "bg=1a2b3c"),
        ("v=abc.1_2-3", "v=abc.1_2-3"),
        ("w=8192", "w=8192"),
        ("w=4096&dpr=2", "w=8192"),
        ("w=100&dpr=1.5", "w=150"),
        ("w=33&dpr=1.5", "w=50"),  # 49.5 rounds half up
        ("w=10&h=7&dpr=1.25&fit=cover", "fit=cover&h=9&w=13"),
        ("dpr=3", ""),  # dpr without a size has nothing to scale
        ("p=thumbnail", "fit=cover&h=64&w=64"),
        ("p=thumbnail&fmt=webp", "fit=cover&fmt=webp&h=64&w=64"),
        ("p=small&dpr=2", "w=256"),
        ("p=full", "w=1024"),
        (
            "w=1&h=1&fit=cover&g=sw&fmt=jpeg&q=90&bg=123&blur=1.25&v=x",
            "bg=112233&blur=1.25&fit=cover&fmt=jpeg&g=sw&h=1&q=90&v=x&w=1",
        ),
        ("s=abc_-DEF&kid=k1&exp=1700000000&w=5", "w=5"),  # signature params never enter the spec
    ],
)
def test_canonical_query(qs: str, expected: str) -> None:
    assert canonical(qs) == expected


@pytest.mark.parametrize(
    "group",
    [
        # order is irrelevant
        ["w=64&h=64&fit=cover", "fit=cover&h=64&w=64", "h=64&fit=cover&w=64"],
        # defaults spelled out or not
        [
            "w=100",
            "w=100&fit=inside",
            "w=100&g=center",
            "w=100&dpr=1",
            "w=100&bg=ffffff",
            "w=100&bg=FFF",
            "w=100&bg=fff&dpr=1&g=center&fit=inside",
            "w=100&dpr=1.00",
        ],
        ["", "fit=inside", "bg=FFFFFF", "dpr=1", "g=center"],
        # dpr multiplies, presets expand
        ["w=128&dpr=2", "w=256", "p=medium", "p=small&dpr=2", "p=medium&dpr=1"],
        ["p=small&w=300", "w=300", "w=300&p=large"],
        ["p=medium&fmt=webp", "w=256&fmt=webp", "fmt=webp&p=medium"],
        ["p=thumbnail", "w=64&h=64&fit=cover", "p=thumbnail&fit=cover&g=center"],
        # a single dimension: fit collapses to inside, gravity to center
        [
            "w=200",
            "w=200&fit=cover",
            "w=200&fit=contain",
            "w=200&fit=fill",
            "w=200&fit=outside",
            "w=200&fit=cover&g=north",
            "w=200&g=smart",
        ],
        ["h=200", "h=200&fit=cover&g=east", "h=200&fit=outside"],
        # gravity only matters for cover/contain with both dimensions (and only compass points for contain)
        ["w=2&h=3", "w=2&h=3&g=north", "w=2&h=3&fit=inside&g=se"],
        ["w=2&h=3&fit=fill", "w=2&h=3&fit=fill&g=west"],
        ["w=2&h=3&fit=outside", "w=2&h=3&fit=outside&g=smart"],
        ["w=2&h=3&fit=contain", "w=2&h=3&fit=contain&g=smart", "w=2&h=3&fit=contain&g=entropy"],
        # quality equal to the explicit format's default collapses; lossless formats ignore it
        ["fmt=jpeg", "fmt=jpeg&q=80"],
        ["fmt=webp", "fmt=webp&q=80"],
        ["fmt=avif", "fmt=avif&q=50"],
        ["fmt=png", "fmt=png&q=10", "fmt=png&q=100"],
        ["fmt=gif", "fmt=gif&q=1"],
        # background spellings
        ["bg=abc", "bg=ABC", "bg=aabbcc", "bg=AaBbCc"],
        # blur spellings
        ["blur=2", "blur=2.0", "blur=2.00", "blur=2.001"],
    ],
)
def test_equivalent_queries(group: list[str]) -> None:
    forms = {qs: canonical(qs) for qs in group}
    assert len(set(forms.values())) == 1, forms


@pytest.mark.parametrize(
    ("qs", "param"),
    [
        ("foo=1", "foo"),
        ("W=100", "W"),
        ("=5", ""),
        ("w=1&w=2", "w"),
        ("w=1&h=2&w=1", "w"),
        ("fmt=webp&fmt=webp", "fmt"),
        ("w=", "w"),
        ("w", "w"),
        ("fit=", "fit"),
        ("v=", "v"),
        ("w=0100", "w"),
        ("w=0", "w"),
        ("w=-5", "w"),
        ("w=%2B5", "w"),
        ("w=+5", "w"),  # parse_qsl turns '+' into a space
        ("w=%205", "w"),
        ("w=5%20", "w"),
        ("w=5.0", "w"),
        ("w=1e3", "w"),
        ("w=0x10", "w"),
        ("w=abc", "w"),
        ("w=٣", "w"),  # non-ASCII digit
        ("w=8193", "w"),
        ("w=99999999999999999999", "w"),
        ("h=8193", "h"),
        ("dpr=5", "dpr"),
        ("dpr=0.5", "dpr"),
        ("dpr=4.5", "dpr"),
        ("dpr=1.234", "dpr"),
        ("dpr=2x", "dpr"),
        ("w=5000&dpr=2", "dpr"),
        ("h=8000&dpr=1.5", "dpr"),
        ("p=large&dpr=4&w=4000", "dpr"),
        ("fit=crop", "fit"),
        ("fit=Cover", "fit"),
        ("g=middle", "g"),
        ("w=10&g=middle", "g"),  # invalid even when it would collapse
        ("fmt=jpg", "fmt"),
        ("fmt=JPEG", "fmt"),
        ("fmt=tiff", "fmt"),
        ("q=0", "q"),
        ("q=101", "q"),
        ("q=50.5", "q"),
        ("fmt=png&q=0", "q"),
        ("bg=ggg", "bg"),
        ("bg=%23fff", "bg"),
        ("bg=ffff", "bg"),
        ("bg=red", "bg"),
        ("blur=0.1", "blur"),
        ("blur=0.29", "blur"),
        ("blur=101", "blur"),
        ("blur=100.01", "blur"),
        ("blur=-1", "blur"),
        ("blur=1e1", "blur"),
        ("blur=.5", "blur"),
        ("blur=5.", "blur"),
        ("blur=nan", "blur"),
        ("v=" + "a" * 33, "v"),
        ("v=a%20b", "v"),
        ("v=a/b", "v"),
        ("p=nope", "p"),
        ("p=Small", "p"),
        ("s=abc%2Bdef", "s"),
        ("s=abc/def", "s"),
        ("s=abc%3D", "s"),
        ("s=" + "a" * 65, "s"),
        ("kid=a.b", "kid"),
        ("kid=" + "k" * 33, "kid"),
        ("exp=abc", "exp"),
        ("exp=-1", "exp"),
        ("exp=01", "exp"),
    ],
)
def test_invalid_query(qs: str, param: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse(qs)
    assert info.value.param == param
    assert info.value.status == 400
    assert info.value.detail


@pytest.mark.parametrize(
    ("qs", "needle"),
    [
        ("fmt=jpg", "use jpeg"),
        ("w=0", "1..8192"),
        ("q=101", "1..100"),
        ("fit=crop", "cover, contain, fill, inside, outside"),
        ("blur=101", "0.3..100"),
        ("dpr=5", "1..4"),
        ("p=nope", "thumbnail"),
        ("zzz=1", "allowed: w, h"),
    ],
)
def test_invalid_detail_names_allowed_values(qs: str, needle: str) -> None:
    with pytest.raises(InvalidParameter, match=needle):
        parse(qs)


def test_max_output_dim_is_configurable() -> None:
    limits = SpecLimits(max_output_dim=100)
    assert parse("w=100", limits).spec.width == 100
    with pytest.raises(InvalidParameter, match=r"1\.\.100") as info:
        parse("w=101", limits)
    assert info.value.param == "w"
    with pytest.raises(InvalidParameter) as info:
        parse("w=60&dpr=2", limits)
    assert info.value.param == "dpr"


def test_parsed_fields() -> None:
    parsed = parse("p=thumbnail&w=80&dpr=2&fmt=webp&q=70&bg=000&blur=1.5&g=nw&v=7&s=sig_-&kid=k-1&exp=1700000000")
    assert parsed.preset == "thumbnail"
    assert parsed.signature == SignatureParams(s="sig_-", kid="k-1", exp=1700000000)
    assert parsed.spec == TransformSpec(
        width=160,
        height=128,
        fit="cover",
        gravity="nw",
        format="webp",
        quality=70,
        background="000000",
        blur=1.5,
        version="7",
    )
    bare = parse("w=5")
    assert bare.preset is None
    assert bare.signature == SignatureParams()


def test_render_key_excludes_version() -> None:
    spec = parse("w=10&v=abc&fmt=png").spec
    assert spec.canonical_query() == "fmt=png&v=abc&w=10"
    assert spec.render_key() == "fmt=png&w=10"
    assert parse("v=2").spec.render_key() == ""
    assert parse("w=10&v=1").spec.render_key() == parse("w=10&v=2").spec.render_key()


def test_default_presets_are_valid_config() -> None:
    text = format_presets(DEFAULT_PRESETS)
    assert text == (
        "thumbnail:w=64&h=64&fit=cover;small:w=128;medium:w=256;large:w=512;full:w=1024;placeholder:w=32&fmt=webp"
    )
    assert parse_presets(text) == dict(DEFAULT_PRESETS)
    assert list(parse_presets(text)) == list(DEFAULT_PRESETS)  # the order ?p= names are listed in


def test_parse_presets() -> None:
    presets = parse_presets(" thumbnail:w=64&h=64&fit=cover ; small:w=128;hero_2-x:w=1200&h=400&fit=cover&g=smart; ")
    assert presets == {
        "thumbnail": (("w", "64"), ("h", "64"), ("fit", "cover")),
        "small": (("w", "128"),),
        "hero_2-x": (("w", "1200"), ("h", "400"), ("fit", "cover"), ("g", "smart")),
    }
    assert parse_presets("") == {}
    limits = SpecLimits(presets=presets)
    assert parse("p=hero_2-x&fmt=avif", limits).spec.canonical_query() == "fit=cover&fmt=avif&g=smart&h=400&w=1200"
    with pytest.raises(InvalidParameter) as info:
        parse("p=medium", limits)
    assert info.value.param == "p"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("Thumb:w=64", "malformed preset"),
        ("thumb w=64", "malformed preset"),
        (":w=64", "malformed preset"),
        ("a.b:w=64", "malformed preset"),
        ("small:", "no parameters"),
        ("small:w=64;small:w=32", "defined twice"),
        ("small:w=0", "'small'"),
        ("small:w=64&w=32", "more than once"),
        ("small:fit=crop", "fit must be"),
        ("small:fmt=jpg", "use jpeg"),
        ("small:zoom=2", "unknown parameter"),
        ("small:w=", "empty value"),
        ("small:p=medium", "may not set p"),
        ("small:w=5&v=1", "may not set v"),
        ("small:s=abc", "may not set s"),
        ("small:kid=k", "may not set kid"),
        ("small:exp=5", "may not set exp"),
    ],
)
def test_parse_presets_rejects(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_presets(text)


CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = "image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
FIREFOX_OLD = "image/webp,*/*"
SAFARI = (
    "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,"
    "image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
)
SAFARI_OLD = "image/webp,image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5"


@pytest.mark.parametrize(
    ("accept", "token"),
    [
        (CHROME, "avif"),
        (FIREFOX, "avif"),
        (FIREFOX_OLD, "webp"),
        (SAFARI, "avif"),
        (SAFARI_OLD, "webp"),
        ("*/*", "legacy"),  # curl
        ("image/*", "legacy"),
        ("image/*,*/*;q=0.8", "legacy"),
        (None, "legacy"),
        ("", "legacy"),
        ("image/avif;q=0,image/webp", "webp"),
        ("image/avif;q=0.0,image/webp;q=0", "legacy"),
        ("image/avif;q=0.001", "avif"),
        ("IMAGE/AVIF ; Q=0.5", "avif"),
        (" image/webp ;  q=1.000 ", "webp"),
        ("image/avif;q=2,image/webp", "webp"),  # malformed q: that range is ignored
        ("image/avif;q=abc", "legacy"),
        ("image/avifx,image/webpp", "legacy"),
        ("image/avif;level=1;q=0.9", "avif"),
        (";;;,,,==;q=;", "legacy"),
        ("\x00\xff garbage ,;q=0.5,image/", "legacy"),
        ("image/webp," * 1000, "webp"),
    ],
)
def test_accept_token(accept: str | None, token: AcceptToken) -> None:
    assert accept_token(accept) == token


@pytest.mark.parametrize(
    ("requested", "accept", "source", "alpha", "animated", "expected"),
    [
        # explicit formats are honoured as is
        ("jpeg", "avif", "png", True, False, "jpeg"),
        ("png", "legacy", "jpeg", False, False, "png"),
        ("webp", "legacy", "gif", False, True, "webp"),
        ("gif", "avif", "jpeg", False, False, "gif"),
        ("avif", "legacy", "tiff", True, False, "avif"),
        # none keeps the original's family
        (None, "avif", "jpeg", False, False, "jpeg"),
        (None, "avif", "png", True, False, "png"),
        (None, "legacy", "gif", False, True, "gif"),
        (None, "legacy", "webp", True, True, "webp"),
        (None, "webp", "avif", False, False, "avif"),
        (None, "avif", "heif", False, False, "jpeg"),
        (None, "avif", "heif", True, False, "png"),
        (None, "webp", "tiff", False, False, "jpeg"),
        (None, "webp", "tiff", True, False, "png"),
        # auto negotiates
        ("auto", "avif", "jpeg", False, False, "avif"),
        ("auto", "webp", "jpeg", False, False, "webp"),
        ("auto", "legacy", "jpeg", False, False, "jpeg"),
        ("auto", "legacy", "png", True, False, "png"),
        ("auto", "legacy", "webp", True, False, "png"),
        ("auto", "legacy", "gif", False, False, "jpeg"),
        ("auto", "avif", "gif", True, True, "webp"),
        ("auto", "webp", "gif", False, True, "webp"),
        ("auto", "legacy", "gif", False, True, "gif"),
        ("auto", "legacy", "webp", True, True, "gif"),
    ],
)
def test_choose_output_format(
    requested: RequestedFormat | None,
    accept: AcceptToken,
    source: SourceFormat,
    alpha: bool,
    animated: bool,
    expected: OutputFormat,
) -> None:
    assert choose_output_format(requested, accept, source, alpha, animated) == expected


@pytest.mark.parametrize(
    ("qs", "varies"),
    [("fmt=auto", True), ("fmt=auto&w=10", True), ("", False), ("fmt=webp", False), ("fmt=jpeg&w=5", False)],
)
def test_varies_on_accept(qs: str, varies: bool) -> None:
    assert varies_on_accept(parse(qs).spec) is varies
