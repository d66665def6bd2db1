"""`--out` never destroys what omni did not write: `omni export`, `omni convert`, `omni data shapes`
refuse a non-empty target that is not theirs (unless --force), and replace their own output only
after the new one is complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY

from omni.config import load_config
from omni.layout import SpecialIds
from omni.tokenizers.text import TextTokenizer
from omni.train.synthetic import SyntheticBatches

SEQ, N_IMAGE, TOKEN_DIM = 48, 16, 192


@pytest.fixture(scope="module")
def run_dir(tokenizer_dir, tmp_path_factory):
    from omni.train.loop import train

    tok = TextTokenizer.from_pretrained(tokenizer_dir)
    special = SpecialIds(tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.img_id)
    cfg = load_config("tiny", [
        f"model.tokenizer={tokenizer_dir}", *TINY, f"train.out_dir={tmp_path_factory.mktemp('r') / 'run'}",
        "train.precision=fp32", "train.steps=2", "train.log_every=1", "train.val_every=0", "train.warmup_steps=2",
        "data.batch_size=2", f"data.seq_len={SEQ}",
    ])
    return train(cfg, batches=lambda rank, world: SyntheticBatches(special, len(tok), TOKEN_DIM, N_IMAGE, rows=2,
                                                                     seq_len=SEQ, rank=rank, world_size=world))


def user_files(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "thesis.tex").write_text("years of work")
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("a")
    return {"thesis.tex": "years of work", "notes/a.txt": "a"}


def intact(root: Path, files: dict[str, str]) -> bool:
    return all((root / k).read_text() == v for k, v in files.items())


def test_export_refuses_a_directory_it_did_not_write(run_dir, tmp_path, capsys):
    from omni.cli import main
    from omni.train.export import export

    out = tmp_path / "mine"
    files = user_files(out)
    with pytest.raises(FileExistsError, match=r"--out .*mine is not empty \(notes, thesis.tex\) and is not an omni "
                                              r"checkpoint; .* pass --force"):
        export(run_dir, out, ema=False)
    assert intact(out, files)
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an omni checkpoint" in err[0] and intact(out, files)
    export(run_dir, out, ema=False, force=True)  # asked for: replaced
    assert (out / "model.safetensors").exists() and not (out / "thesis.tex").exists()


def test_export_replaces_its_own_checkpoint_and_refuses_a_file(run_dir, tmp_path):
    from omni.train.export import export

    out = export(run_dir, tmp_path / "ckpt", ema=False)
    first = (out / "export.json").read_text()
    export(run_dir, out, ema=False)  # an omni checkpoint: replaced
    assert json.loads((out / "export.json").read_text()) == json.loads(first)
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary or set-aside copies left
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        export(run_dir, tmp_path / "file", ema=False)
    assert (tmp_path / "file").read_text() == "x"


def test_convert_refuses_before_any_work(tmp_path):
    from omni.models.convert import convert_chameleon

    out = tmp_path / "mine"
    files = user_files(out)
    with pytest.raises(FileExistsError, match="is not an omni checkpoint"):
        convert_chameleon(tmp_path / "no-such-source", out)  # the --out check comes first
    assert intact(out, files)


def test_data_shapes_keeps_shards_it_did_not_write(tmp_path):
    from omni.data.writers import write_shapes

    out = tmp_path / "data"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    (out / "val-000007.tar").write_bytes(b"another")
    with pytest.raises(FileExistsError, match=r"holds shards that omni data did not write there "
                                              r"\(train-000000.tar, val-000007.tar\).*--force"):
        write_shapes(out, 20, 10, shard_size=10)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's shard"
    assert (out / "val-000007.tar").read_bytes() == b"another"
    write_shapes(out, 20, 10, shard_size=10, force=True)
    assert not (out / "val-000007.tar").exists()
    # its own shard set: rewritten, stale shards of the larger earlier run removed
    write_shapes(out, 10, 10, shard_size=10)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]


def test_data_convert_keeps_shards_it_did_not_write(tmp_path):
    from omni.cli import main

    out = tmp_path / "data"
    out.mkdir()
    (out / "train-000003.tar").write_bytes(b"theirs")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text_list": ["a"], "image_info": []}) + "\n")
    assert main(["data", "convert", "--format", "mmc4", "--input", str(src), "--out", str(out)]) != 0
    assert (out / "train-000003.tar").read_bytes() == b"theirs"
