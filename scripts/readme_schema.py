"""Regenerate the schema blocks from mmprof/results/schema.py: in README.md each command's columns in
CSV order (names only), in docs/schema.md the same columns with their meanings."""

import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmprof.results import schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README, SCHEMA_DOC = ROOT / "README.md", ROOT / "docs" / "schema.md"
KEYS = [*schema.SPEC_COLUMNS, "provenance"]


def described(key: str) -> dict[str, str]:
    return schema.PROVENANCE_COLUMNS if key == "provenance" else schema.describe(key)


def names(columns: dict[str, str]) -> str:
    return "\n".join(textwrap.wrap(" ".join(f"`{name}`" for name in columns), 100))


def table(columns: dict[str, str]) -> str:
    lines = ["| column | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {text} |" for name, text in columns.items()]
    return "\n".join(lines)


def fill(path: Path, render) -> None:
    text = path.read_text()
    for key in KEYS:
        pattern = re.compile(rf"<!-- schema:{re.escape(key)} -->.*?<!-- /schema:{re.escape(key)} -->", re.S)
        text = pattern.sub(lambda _: f"<!-- schema:{key} -->\n{render(described(key))}\n<!-- /schema:{key} -->", text)
    path.write_text(text)


def main() -> None:
    fill(README, names)
    fill(SCHEMA_DOC, table)


if __name__ == "__main__":
    main()
