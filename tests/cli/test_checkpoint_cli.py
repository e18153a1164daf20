"""--checkpoint on decode-power and train-memory, --prompt, and `mmprof inspect`, on folders the
workload tests build from scratch."""

import pandas as pd
import pytest

from tests.cli.helpers import assert_one_line_exit_2, assert_rejected_before_writing, invoke
from tests.workloads.test_checkpoint_formats import llama_folder, reference_folder, tokenizer_file

QUICK = ("--device", "cpu", "--new-tokens", "3", "--repeats", "1", "--min-window-s", "0", "--idle-s", "0")


@pytest.mark.parametrize("make,arch,weights", [(reference_folder, "mmfree", "packed"), (llama_folder, "transformer", "bf16")],
                         ids=["hgrn_bit-packed", "llama"])
def test_decode_power_decodes_a_checkpoint_with_a_prompt(tmp_path, make, arch, weights):
    _, folder = make(tmp_path)
    vocab = tokenizer_file(folder)
    out = tmp_path / "run"
    extra = ("--weights", "packed") if weights == "packed" else ()
    r = invoke("decode-power", "--checkpoint", str(folder), "--prompt", "hello ternary world", *extra, *QUICK,
               "--out", str(out))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "measurements.csv")
    assert list(df["arch"]) == [arch] and list(df["weights"]) == [weights] and list(df["status"]) == ["ok"]
    assert list(df["size"]) == [str(folder)] and list(df["prompt_len"]) == [3]
    assert len(vocab) > 3
    zeros = df["ternary_zero_frac"].iloc[0]
    assert (0.1 < zeros < 0.9) if arch == "mmfree" else pd.isna(zeros)


def test_train_memory_takes_the_checkpoints_shape(tmp_path):
    _, folder = llama_folder(tmp_path)
    out = tmp_path / "run"
    r = invoke("train-memory", "--checkpoint", str(folder), "--device", "meta", "--batch", "1", "--seq", "32",
               "--out", str(out))
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out / "measurements.csv")
    assert list(df["arch"]) == ["transformer"] and list(df["status"]) == ["ok"] and df["peak_alloc_gib"].iloc[0] > 0


def test_inspect_prints_the_bitlinear_table(tmp_path):
    _, folder = reference_folder(tmp_path, shards=2)
    r = invoke("inspect", str(folder), "--format", "csv")
    assert r.exit_code == 0, r.output
    assert "packed_gib" in r.output and "zero_frac" in r.output
    assert "model.layers.2.mlp.down_proj" in r.output and "lm_head" in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (("decode-power", "--size", "tiny", "--prompt", "hello"), "--prompt needs --checkpoint"),
        (("decode-power", "--checkpoint", "CKPT", "--size", "tiny"), "give --size or --checkpoint"),
        (("decode-power", "--checkpoint", "CKPT", "--prompt", "hello"), "no tokenizer.json"),
        (("decode-power", "--checkpoint", "CKPT", "--arch", "mmfree"), "leaves it out"),
        (("decode-power", "--checkpoint", "nobody/not-cached-anywhere"), "not in the local Hugging Face cache"),
        (("train-memory", "--checkpoint", "CKPT", "--size", "1.3b"), "give --size or --checkpoint"),
    ],
    ids=["prompt-no-ckpt", "size-and-ckpt", "no-tokenizer", "arch-excluded", "not-cached", "train-size-and-ckpt"],
)
def test_checkpoint_options_refuse_bad_input(tmp_path, monkeypatch, args, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, folder = llama_folder(tmp_path)
    args = tuple(str(folder) if a == "CKPT" else a for a in args)
    assert_rejected_before_writing(tmp_path, (*args, "--device", "cpu"), needle)


def test_inspect_of_a_missing_folder_is_one_line(tmp_path):
    assert_one_line_exit_2(invoke("inspect", str(tmp_path / "absent")), "no such folder")
