"""Regenerate the column tables of README.md's "Results schema" from mmprof/results/schema.py."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmprof.results import schema  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def table(columns: dict[str, str]) -> str:
    lines = ["| column | meaning |", "|---|---|"]
    lines += [f"| `{name}` | {text} |" for name, text in columns.items()]
    return "\n".join(lines)


def block(key: str) -> str:
    cols = schema.PROVENANCE_COLUMNS if key == "provenance" else schema.describe(key)
    return f"<!-- schema:{key} -->\n{table(cols)}\n<!-- /schema:{key} -->"


def main() -> None:
    text = README.read_text()
    for key in [*schema.SPEC_COLUMNS, "provenance"]:
        pattern = re.compile(rf"(SCHEMA:{re.escape(key)}|<!-- schema:{re.escape(key)} -->.*?<!-- /schema:{re.escape(key)} -->)",
                             re.S)
        text = pattern.sub(lambda _: block(key), text)
    README.write_text(text)


if __name__ == "__main__":
    main()
