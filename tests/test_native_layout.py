"""The CPU kernels' one source per fact: the block's parameter slots (csrc/slots.h, read by slots.py and
compiled into the library) and the exported functions (csrc/api.h, against lib.py's ctypes table)."""

import ctypes
import os
import re

import pytest

from simplegpt.accel.cpu import lib
from simplegpt.accel.cpu.slots import BLOCK_SLOTS, HEADER, read_slots
from simplegpt.model import Block, GPTConfig

CTYPES = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float, "double": ctypes.c_double}


def _ctype(decl: str) -> type | None:
    """The ctypes type lib.py passes for a C type (a parameter's name, if any, is left off first)."""
    if "*" in decl:
        return ctypes.c_char_p if re.fullmatch(r"const char \*", decl.strip()) else ctypes.c_void_p
    words = [w for w in decl.split() if w != "const"]
    return None if words == ["void"] else CTYPES[words[0]]


def api_declarations() -> dict[str, tuple[type | None, list[type]]]:
    text = re.sub(r"/\*.*?\*/|^#[^\n]*", "", (lib.HERE / "api.h").read_text(), flags=re.S | re.M)
    out = {}
    for ret, name, args in re.findall(r"SG_API\s+([^;]*?)\b(sg_\w+)\s*\(([^)]*)\)\s*;", text):
        params = [] if args.strip() == "void" else [re.sub(r"\w+\s*$", "", a) for a in args.split(",")]
        out[name] = (_ctype(ret), [_ctype(p) for p in params])
    return out


def test_ctypes_table_matches_the_c_declarations():
    declared = api_declarations()
    assert declared.keys() == lib.SIGNATURES.keys()
    for name, (restype, argtypes) in lib.SIGNATURES.items():
        assert declared[name] == (restype, argtypes), name


def test_every_exported_function_is_declared_in_api_h():
    """A function the sources define without static must be in api.h (the rest is hidden and unreachable)."""
    declared = api_declarations()
    for source in lib.SOURCES:
        text = re.sub(r"/\*.*?\*/", "", source.read_text(), flags=re.S)
        for name in re.findall(r"^[a-z][\w ]*?\**\b(sg_\w+)\s*\([^;{]*\)\s*\{", text, flags=re.M):
            assert name in declared, f"{source.name} defines {name}, which api.h does not declare"


def test_sources_and_headers_are_all_compiled_and_hashed():
    csrc = lib.HERE
    assert sorted(lib.SOURCES) == sorted(csrc.glob("*.c"))
    assert sorted(lib.HEADERS) == sorted(csrc.glob("*.h"))


def test_block_slots_come_from_the_header_in_block_order():
    assert BLOCK_SLOTS == read_slots(HEADER)
    block = Block(GPTConfig(vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    assert [f"{mod}.{name}" for mod, name in BLOCK_SLOTS] == [name for name, _ in block.named_parameters()]


def test_slots_py_reads_whatever_the_header_lists(tmp_path):
    text = HEADER.read_text()
    swapped = tmp_path / "slots.h"
    swapped.write_text(text.replace('X(LN1_W, "ln_1", "weight")', 'X(LN1_W, "ln_1", "bias2")'))
    assert read_slots(swapped)[0] == ("ln_1", "bias2") and read_slots(swapped)[1:] == BLOCK_SLOTS[1:]
    broken = tmp_path / "empty.h"
    broken.write_text("/* nothing */\n")
    with pytest.raises(RuntimeError, match="no BLOCK_SLOTS"):
        read_slots(broken)


@pytest.mark.skipif(lib.load() is None and not os.environ.get("CI"), reason="kernels unavailable here")
def test_the_compiled_library_has_the_same_slots():
    native = lib.load()
    assert native is not None, lib.unavailable_reason()
    names = [native.sg_block_slot(i) for i in range(len(BLOCK_SLOTS) + 1)]
    assert names == [f"{mod}.{name}".encode() for mod, name in BLOCK_SLOTS] + [None]
    assert native.sg_block_slot(-1) is None
