"""Bad inputs get one line naming the value and the fix (the traceback only with `omni --debug`),
checks come before work, and chat keeps the conversation when a message cannot fit."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import torch
from conftest import TINY
from PIL import Image

from omni.cli import main
from omni.config import load_config


@pytest.fixture(scope="module")
def ckpt(tokenizer_dir, tmp_path_factory):
    from omni.models.model import OmniModel

    cfg = load_config("tiny", [f"model.tokenizer={tokenizer_dir}", *TINY, "generation.image_steps=2",
                               "generation.max_new_tokens=4"])
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model).eval()
    model.run_config = cfg
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    model.save_pretrained(path)
    return path


def one_line(capsys, argv: list[str]) -> str:
    """Run `omni ARGV`, expect a failure reported in exactly one line without a traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("omni: error: ") and "Traceback" not in err[0], err
    return err[0]


def gen(ckpt, *extra: str) -> list[str]:
    return ["generate", "--ckpt", str(ckpt), "--prompt", "a red circle", "--mode", "text", *extra]


def test_decompression_bomb_image(ckpt, tmp_path, capsys, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (300, 300)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300x300 is over twice the limit
    line = one_line(capsys, gen(ckpt, "--image", str(bomb)))
    assert str(bomb) in line and "too large to open safely" in line


def test_directory_as_image(ckpt, tmp_path, capsys):
    line = one_line(capsys, gen(ckpt, "--image", str(tmp_path)))
    assert f"image {str(tmp_path)!r} is a directory" in line


def test_out_naming_a_file_is_refused_before_generating(ckpt, tmp_path, capsys, monkeypatch):
    import omni.inference.generate as g

    called = []
    monkeypatch.setattr(g, "generate_by_mode", lambda *a, **k: called.append(1))
    (tmp_path / "taken").write_text("x")
    line = one_line(capsys, gen(ckpt, "--out", str(tmp_path / "taken")))
    assert "--out" in line and "is a file" in line and not called


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_generating(ckpt, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    line = one_line(capsys, gen(ckpt, "--out", str(ro)))
    assert "not writable" in line


def test_cuda_device_on_a_cpu_build(ckpt, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line(capsys, gen(ckpt, "--device", "cuda"))
    assert "--device cuda" in line and "use --device cpu" in line
    assert "not a device" in one_line(capsys, gen(ckpt, "--device", "gpu0"))


def test_gen_value_is_type_checked_before_anything_is_recorded(ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    line = one_line(capsys, ["eval", "--ckpt", str(ckpt), "--benchmark", "shapes-vqa", "--limit", "1",
                             "--out", str(out), "--gen", "cfg_scale=abc", "--no-progress"])
    assert "cfg_scale: expected a number, got 'abc'" in line
    assert not (out / "run.json").exists()


def test_sampling_error_names_only_the_broken_rule(ckpt, capsys):
    line = one_line(capsys, gen(ckpt, "--top-p", "1.5"))
    assert "top_p=1.5 must be in (0, 1]" in line and "max_new_tokens" not in line and "top_k" not in line


def test_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-3\n")
    line = one_line(capsys, ["train", "--config", str(bad)])
    assert str(bad) in line and "not valid YAML" in line and "line" in line
    assert "not valid YAML" in one_line(capsys, ["train", "train.lr=[1,"])


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", None])
def test_broken_safetensors_names_the_file(ckpt, tmp_path, capsys, content):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if content is None else content)  # None: truncated
    line = one_line(capsys, gen(broken))
    assert str(weights) in line and "not a readable safetensors file" in line


def test_ckpt_pointing_at_a_file(ckpt, capsys):
    line = one_line(capsys, gen(ckpt / "config.yaml"))
    assert "is a file; give the checkpoint directory" in line


def test_os_errors_name_the_path():
    from omni.errors import describe

    full = OSError(28, "No space left on device", "/data/out/model.safetensors")
    assert describe(full) == ("no space left on the device while writing /data/out/model.safetensors; "
                              "free some space or choose another --out")
    ro = PermissionError(13, "Permission denied", "/ro/x")
    assert "cannot write /ro/x: Permission denied; choose a writable --out" in describe(ro)
    assert "disk may be full" in describe(RuntimeError("basic_ios::clear: iostream error"))
    assert describe(KeyError("bug")) is None  # bugs keep their traceback


def test_debug_shows_the_traceback(ckpt, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        main(["--debug", *gen(ckpt, "--image", str(tmp_path))])


def test_chat_keeps_the_conversation_when_a_message_cannot_fit(ckpt):
    from omni.inference.chat import ChatSession
    from omni.inference.generate import generation_config, load

    model = load(ckpt, "cpu")
    out = io.StringIO()
    s = ChatSession(model, generation_config(model, max_new_tokens=4), ckpt.parent / "imgs", seed=0,
                    preview=False, out=out)
    assert s.handle("a red circle.") and len(s.history) == 2
    s.handle("circle " * 600)
    assert len(s.history) == 2  # before: the history was dropped, then the message refused anyway
    said = out.getvalue()
    assert "dropped" not in said and "shorten it by at least" in said
    over = int(said.split("shorten it by at least ")[1].split()[0])
    assert over > 0 and json.dumps(over)


def test_eval_records_batch_size_and_refuses_a_resume_with_another(ckpt, tmp_path):
    from omni.eval import evaluate

    out = tmp_path / "eval"
    res = evaluate(ckpt, "shapes-vqa", out, limit=2, batch_size=2, progress=False)
    assert res["batch_size"] == 2 and json.loads((out / "run.json").read_text())["batch_size"] == 2
    with pytest.raises(ValueError, match=r"\(batch_size differ\); use another --out directory, or --overwrite"):
        evaluate(ckpt, "shapes-vqa", out, limit=2, batch_size=1, progress=False)


def test_every_command_prints_its_help():
    """`--help` of every command and subcommand formats (a bare % in a help text broke `omni demo --help`)."""
    import argparse

    from omni.cli import build_parser

    seen = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        text = parser.format_help()
        assert text.startswith("usage:"), path
        seen.append(path)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")

    walk(build_parser(), "omni")
    assert {"omni demo", "omni data shapes", "omni serve", "omni eval", "omni train"} <= set(seen)


@pytest.mark.parametrize("argv, usage, hint", [
    (["generate", "--ckpt", "c", "--promt", "a circle"], "usage: omni generate", "(did you mean --prompt?)"),
    (["generate", "--ckpt", "c", "--promt", "x", "--sed", "1"], "usage: omni generate",
     "(did you mean --prompt for --promt, --seed for --sed?)"),
    (["data", "shapes", "--out", "d", "--sede", "3"], "usage: omni data shapes", "(did you mean --seed?)"),
    (["convert", "chameleon", "--src", "a", "--out", "b", "--vqgn", "v"], "usage: omni convert chameleon",
     "(did you mean --vqgan?)"),
    (["eval", "--ckpt", "c", "--benchmark", "b", "--bogus"], "usage: omni eval", None),
])
def test_an_unknown_flag_shows_the_commands_usage_and_the_closest_flag(argv, usage, hint, capsys):
    """A mistyped flag stops before any work with the command's own usage (not the top-level one)
    and, when one of its flags is close, that flag; a flag like nothing it has gets no guess."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(usage), err
    last = err.strip().splitlines()[-1]
    assert "unrecognized arguments: " in last
    if hint:
        assert last.endswith(hint), last
    else:
        assert "did you mean" not in last, last
