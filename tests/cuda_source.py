"""Read kernel sources in CPU tests: the argument structs of kernels_cu/args.cuh."""

from __future__ import annotations

import re

from moecomm import kernels

# C type -> (kind, bytes): kind "ptr", "int", "uint" or "float"; nested structs resolve
# to their own field list.
_SCALARS = {"int8_t": ("int", 1), "uint8_t": ("uint", 1), "int16_t": ("int", 2),
            "uint16_t": ("uint", 2), "int32_t": ("int", 4), "uint32_t": ("uint", 4),
            "int64_t": ("int", 8), "uint64_t": ("uint", 8), "float": ("float", 4),
            "double": ("float", 8)}


def kernel_source(name: str) -> str:
    return (kernels.source_dir() / name).read_text()


def structs(source: str, defines: dict[str, int]) -> dict[str, list[tuple]]:
    """Every ``struct Name { ... };`` of ``source``: ``[(field, kind, count, nested)]``
    with ``kind`` one of ptr/int/uint/float/struct and array extents resolved through
    ``defines``. One field per line; anything else fails the parse."""
    found: dict[str, list[tuple]] = {}
    for name, body in re.findall(r"^struct (\w+) \{\n(.*?)^\};", source, re.S | re.M):
        fields = []
        for line in body.splitlines():
            line = line.split("//")[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"(?:const\s+)?(\w+)\s*(\*?)\s*(?:const\s+)?(\w+)(?:\[(\w+)\])?;", line)
            assert m, f"{name}: cannot read field line {line!r} (one field per line)"
            ctype, pointer, field, extent = m.groups()
            count = int(defines.get(extent, extent)) if extent else 1
            if pointer:
                fields.append((field, "ptr", count, None))
            elif ctype in _SCALARS:
                fields.append((field, _SCALARS[ctype][0], count, _SCALARS[ctype][1]))
            else:
                assert ctype in found, f"{name}.{field}: unknown type {ctype}"
                fields.append((field, "struct", count, ctype))
        found[name] = fields
    return found


def layout(name: str, table: dict[str, list[tuple]]) -> tuple[int, int, list[tuple]]:
    """(size, alignment, [(field, offset)]) of struct ``name`` under C's natural alignment."""
    offset, align, placed = 0, 1, []
    for field, kind, count, extra in table[name]:
        if kind == "struct":
            size, a, _ = layout(extra, table)
        else:
            size = a = 8 if kind == "ptr" else extra
        offset = -(-offset // a) * a
        placed.append((field, offset))
        offset += size * count
        align = max(align, a)
    return -(-offset // align) * align, align, placed
