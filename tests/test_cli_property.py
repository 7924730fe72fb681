"""Property test over the CLI: random flag values and data rows give exit 0 (a bad row skipped and counted)
or exit 2 with one line, never a traceback, and never remove or change a file the run did not write."""
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmmr1_lite.cli import main

FAST = ["--max-steps", "1", "--eval-size", "0", "--prompts-per-step", "2", "--num-generations", "2",
        "--max-new-tokens", "4", "--instruct-prior-steps", "0", "--train-size", "16", "--save-every", "0"]
FLAGS = ["--max-steps", "--learning-rate", "--num-generations", "--prompts-per-step", "--max-new-tokens", "--beta",
         "--temperature", "--eval-size", "--lora-r", "--max-grad-norm", "--loss-agg", "--reward-timeout", "--keep-last",
         "--max-prompt-tokens", "--min-pixels", "--epsilon-low", "--warmup-ratio", "--set"]
VALUES = ["0", "-1", "1", "2", "nan", "inf", "-inf", ".inf", "1e309", "abc", "", "[]", "{}", "null", "true", "0.5",
          "99999999999999999999", "token_mean", "lora_r=", "rewards={}", "rewards={format: x}", "=1", "stage=mgt"]
# A huge value of these is valid and asks for a run that never ends in a test's time (a fresh clone's suite once
# hung in a run of --max-steps 99999999999999999999, 2026-12-04): such examples are skipped.
WORK_SIZES = {"--max-steps", "--num-generations", "--prompts-per-step", "--max-new-tokens", "--eval-size"}
GOOD_ROW = json.dumps({"prompt": "what is 1 + 1", "answer": "2"})
ROWS = [
    GOOD_ROW.encode(),
    b'{"prompt": "unclosed',
    json.dumps({"prompt": 5, "answer": []}).encode(),
    json.dumps({"message": 3, "answer": "1"}).encode(),
    json.dumps({"message": json.dumps([{"role": "user", "content": 7}]), "answer": "1"}).encode(),
    json.dumps({"prompt": "x", "answer": "1", "images": ["missing.png"]}).encode(),
    json.dumps({"prompt": "x", "answer": "1", "images": "not-a-list"}).encode(),
    json.dumps({"prompt": "x" * 100_000, "answer": "1"}).encode(),
    json.dumps({"prompt": "x", "answer": "\\frac{" * 500}).encode(),
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    json.dumps({"prompt": "x", "answer": "1", "images": ["bomb.png"]}).encode(),
    json.dumps({"prompt": "x", "answer": "1", "images": ["truncated.png"]}).encode(),
]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bad_images(root: Path) -> None:
    """`bomb.png`: a header claiming 20,000 x 20,000 pixels (a decompression bomb to PIL); `truncated.png`:
    a real PNG cut in half."""
    import struct

    from PIL import Image

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    Image.new("RGB", (64, 64), "red").save(root / "whole.png")
    whole = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def files(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@settings(max_examples=14, deadline=None, suppress_health_check=list(HealthCheck))
@given(flags=st.lists(st.tuples(st.sampled_from(FLAGS), st.sampled_from(VALUES)), max_size=3),
       rows=st.lists(st.sampled_from(ROWS), min_size=0, max_size=6), skip=st.booleans(),
       foreign_config=st.booleans(), overwrite=st.booleans())
def test_cli_never_tracebacks_and_never_removes_foreign_files(flags, rows, skip, foreign_config, overwrite):
    assume(not any(flag in WORK_SIZES and value == "99999999999999999999" for flag, value in flags))
    root = Path(tempfile.mkdtemp())
    try:
        write_bad_images(root)
        data = root / "data.jsonl"
        data.write_bytes(b"\n".join(rows + [GOOD_ROW.encode()] * 4) + b"\n")
        out = root / "out"
        (out / "src").mkdir(parents=True)
        (out / "src" / "notes.txt").write_text("mine")
        (out / "keep.txt").write_text("mine too")
        if foreign_config:
            (out / "config.yaml").write_text("max_steps: 1\n")
        before = files(out)
        argv = ["train", "--output-dir", str(out), "--data", str(data), "--on-bad-row", "skip" if skip else "error"]
        argv += FAST + (["--overwrite"] if overwrite else []) + [item for pair in flags for item in pair]
        code, err = run_cli(argv)
        assert "Traceback" not in err, err
        assert code in (0, 2), (code, err)
        if code == 2:
            errors = [line for line in err.strip().splitlines() if "error:" in line]
            assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
        after = files(out)
        assert all(after.get(name) == content for name, content in before.items()), "a file the run did not write changed"
        if foreign_config:
            assert code == 2, "a directory holding a config.yaml lmmr1-lite did not write is never used"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(st.sampled_from(ROWS), min_size=1, max_size=6), skip=st.booleans())
def test_data_validate_never_tracebacks(rows, skip):
    root = Path(tempfile.mkdtemp())
    try:
        write_bad_images(root)
        data = root / "data.jsonl"
        data.write_bytes(b"\n".join(rows) + b"\n")
        code, err = run_cli(["data", "validate", str(data), "--on-bad-row", "skip" if skip else "error"])
        assert "Traceback" not in err and code in (0, 2), (code, err)
        if code == 2:
            assert len([line for line in err.strip().splitlines() if "error:" in line]) == 1, err
    finally:
        shutil.rmtree(root, ignore_errors=True)
