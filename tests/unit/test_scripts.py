"""Every Lua script and its typed wrapper agree on the names and order of the fixed keys and arguments."""

from __future__ import annotations

import inspect
import re
from importlib import resources

import pytest

from nerv_cluster import scripts
from nerv_cluster.scripts import ALL, LuaScript, lua_source, prelude

_LUA = resources.files("nerv_cluster").joinpath("lua")


def test_every_lua_file_has_exactly_one_wrapper() -> None:
    files = sorted(p.name.removesuffix(".lua") for p in _LUA.iterdir() if p.name.endswith(".lua"))
    assert sorted(w.name for w in ALL) == files


@pytest.mark.parametrize("wrapper", ALL, ids=lambda w: w.name)
def test_the_body_uses_every_declared_name_and_no_fixed_position_by_number(wrapper: type[LuaScript]) -> None:
    body = lua_source(wrapper.name)
    for name in (*wrapper.keys, *wrapper.args):
        code = "\n".join(line.split("--", 1)[0] for line in body.splitlines())
        assert re.search(rf"\b{name}\b", code), f"{wrapper.name}.lua never uses {name!r}"
    for array, fixed in (("KEYS", len(wrapper.keys)), ("ARGV", len(wrapper.args))):
        literal = [int(n) for n in re.findall(rf"\b{array}\[(\d+)\]", body)]
        assert not [n for n in literal if n <= fixed], f"{wrapper.name}.lua reads a fixed {array} by number"


@pytest.mark.parametrize("wrapper", ALL, ids=lambda w: w.name)
def test_the_call_takes_the_declared_names_in_order(wrapper: type[LuaScript]) -> None:
    params = [
        p.name
        for p in inspect.signature(wrapper.__call__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    declared = [*wrapper.keys, *wrapper.args]
    assert params[: len(declared)] == declared
    assert wrapper.__doc__, "every wrapper says what its script does"


def test_the_prelude_binds_names_to_positions() -> None:
    assert prelude(("lease", "epoch"), ("token",)) == (
        "local lease = KEYS[1]; local epoch = KEYS[2]; local token = ARGV[1]; local NKEYS, NARGV = 2, 1\n"
    )


def test_a_call_with_the_wrong_number_of_fixed_values_is_refused() -> None:
    class Fake(scripts.Release):
        def __init__(self) -> None:  # no Redis: only the argument check runs
            pass

    with pytest.raises(TypeError, match="takes keys"):
        Fake()._run(["lease"], [])
