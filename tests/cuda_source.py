"""Read kernel sources in CPU tests: the by-value argument structs Python must mirror."""

import re

from moecomm import kernels


def kernel_source(name: str) -> str:
    return (kernels.source_dir() / name).read_text()


def struct_fields(source: str, name: str, defines: dict | None = None) -> list:
    """``[(field, count)]`` of ``struct name { ... };`` whose fields are all 8 bytes wide
    (pointers, int64_t, uint64_t), one per line; ``count`` > 1 for arrays, whose extent
    may be a macro named in ``defines``."""
    body = re.search(r"struct %s \{(.*?)\n\};" % name, source, re.S).group(1)
    fields = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(?:const\s+)?(\w+)\s*(\*?)\s*(\w+)(?:\[(\w+)\])?;", line)
        assert m, f"{name}: cannot read field line {line!r} (one field per line)"
        ctype, pointer, field, count = m.groups()
        assert pointer or ctype in ("int64_t", "uint64_t"), f"{name}.{field}: not 8 bytes"
        fields.append((field, int((defines or {}).get(count, count)) if count else 1))
    return fields
