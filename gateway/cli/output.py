"""How the commands print: tables, JSON, byte sizes."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["cell_text", "human_bytes", "print_listing", "print_result", "print_table"]


def print_listing(
    args: argparse.Namespace, result: dict[str, Any], key: str, columns: list[tuple[str, str]]
) -> int:
    """A listing method's result: as JSON with --json, else as a table of *columns*."""
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print_table(result[key], columns)
    return 0


def print_result(args: argparse.Namespace, result: Any, text: str) -> None:
    """*result* as JSON with --json, else *text*."""
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else text)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """*rows* under the titles of *columns* ((key, title) pairs), left-aligned; "(none)"
    without rows."""
    if not rows:
        print("(none)")
        return
    cells = [
        [("" if r.get(key) is None else cell_text(r.get(key))) for key, _ in columns] for r in rows
    ]
    widths = [
        max(len(title), *(len(row[i]) for row in cells)) for i, (_, title) in enumerate(columns)
    ]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True)).rstrip())


def cell_text(value: Any) -> str:
    """A value as table text (a list's values joined with a backslash, as DICOM writes them)."""
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def human_bytes(count: int) -> str:
    """*count* bytes as "512 B", "1.5 KB" ... "2.0 TB" (powers of 1024)."""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{count} B"
