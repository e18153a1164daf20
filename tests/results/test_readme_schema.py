import re
from pathlib import Path

from mmprof.results import schema

ROOT = Path(__file__).resolve().parents[2]
KEYS = [*schema.SPEC_COLUMNS, "provenance"]


def _block(path: Path, key: str) -> str:
    m = re.search(rf"<!-- schema:{re.escape(key)} -->(.*?)<!-- /schema:{re.escape(key)} -->", path.read_text(), re.S)
    assert m, f"{path.name} lacks the {key} schema block (run scripts/readme_schema.py)"
    return m.group(1)


def _columns(key: str) -> dict[str, str]:
    return schema.PROVENANCE_COLUMNS if key == "provenance" else schema.describe(key)


def test_readme_lists_every_column_in_csv_order():
    for key in KEYS:
        listed = re.findall(r"`([^`]+)`", _block(ROOT / "README.md", key))
        assert listed == list(_columns(key)), f"README's {key} columns are stale (run scripts/readme_schema.py)"


def test_schema_doc_describes_every_column():
    for key in KEYS:
        rows = re.findall(r"^\| `([^`]+)` \| (.+) \|$", _block(ROOT / "docs" / "schema.md", key), re.M)
        assert rows == list(_columns(key).items()), f"docs/schema.md's {key} table is stale (run scripts/readme_schema.py)"


def test_metric_names_carry_units():
    units = {"gib", "s", "ms", "j", "w", "pct", "gbps", "frac"}
    unitless_ok = {"n_steps", "n_power_samples", "n_tokens_measured", "n_counter_updates", "low_confidence", "mfu",
                   "value", "unit", "reference", "target", "passed"}
    for command, cols in schema.METRIC_COLUMNS.items():
        for name in cols:
            assert name in unitless_ok or units & set(name.split("_")), (command, name)
