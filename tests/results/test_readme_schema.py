import re
from pathlib import Path

from mmprof.results import schema

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_column():
    text = README.read_text()
    for key in [*schema.SPEC_COLUMNS, "provenance"]:
        m = re.search(rf"<!-- schema:{re.escape(key)} -->(.*?)<!-- /schema:{re.escape(key)} -->", text, re.S)
        assert m, f"README lacks the {key} schema table (run scripts/readme_schema.py)"
        cols = schema.PROVENANCE_COLUMNS if key == "provenance" else schema.describe(key)
        documented = re.findall(r"^\| `([^`]+)` \|", m.group(1), re.M)
        assert documented == list(cols), f"README's {key} table is stale (run scripts/readme_schema.py)"


def test_metric_names_carry_units():
    units = {"gib", "s", "ms", "j", "w", "pct", "gbps", "frac"}
    unitless_ok = {"n_steps", "n_power_samples", "n_tokens_measured", "n_counter_updates", "low_confidence", "mfu",
                   "value", "unit", "reference", "target", "passed"}
    for command, cols in schema.METRIC_COLUMNS.items():
        for name in cols:
            assert name in unitless_ok or units & set(name.split("_")), (command, name)
