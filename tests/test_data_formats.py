"""Every shape of training data (JSONL, JSON array, parquet, save_to_disk, folders, Hub ids, field
mappings and presets), lazy images under a low descriptor limit, and one-line errors for bad input."""
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from PIL import Image

from lmmr1_lite import data as data_module
from lmmr1_lite import hub
from lmmr1_lite.cli import main
from lmmr1_lite.config import ConfigError, TrainConfig
from lmmr1_lite.data import DataOptions, ImageRef, build_messages, load_rows, load_splits, prepare

REPO = Path(__file__).resolve().parents[1]


def png_bytes(size=(16, 12), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width=20000, height=20000) -> bytes:
    """A valid PNG header for a huge image (no pixel data to speak of): PIL refuses it on open."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


ROWS = [{"prompt": "the circle is red . what color", "answer": "red", "images": ["img/a.png"]},
        {"prompt": "the square is blue . what color", "answer": "blue"},
        {"prompt": "max(1,2)", "answer": 2, "images": ["img/b.png", "img/a.png"]}]


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes((16, 12)))
    (tmp_path / "img" / "b.png").write_bytes(png_bytes((8, 8), "blue"))
    return tmp_path


def write_rows(path: Path, fmt: str, rows: list) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt in ("json", "json_lines_named_json"):
        path.write_text(json.dumps(rows, indent=1) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{**r, "answer": str(r["answer"]), "images": r.get("images", [])}
                                             for r in rows]), path)
    return path


def summary(rows):
    return [(r.prompt, r.answer, [im.size for im in r.images]) for r in rows]


EXPECTED = [("the circle is red . what color", "red", [(16, 12)]), ("the square is blue . what color", "blue", []),
            ("max(1,2)", "2", [(8, 8), (16, 12)])]


@pytest.mark.parametrize("fmt,name", [("jsonl", "train.jsonl"), ("json", "train.json"), ("parquet", "train.parquet"),
                                      ("json_lines_named_json", "train.json")])
def test_file_formats_load_the_same_rows(images, fmt, name):
    rows, report = load_rows(write_rows(images / name, fmt, ROWS))
    assert summary(rows) == EXPECTED and report.rows == 3 and not report.skipped
    assert all(isinstance(im, ImageRef) for r in rows for im in r.images), "images are kept by reference"


def test_save_to_disk_dataset_with_image_feature_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question": datasets.Value("string"), "label": datasets.Value("string"),
                                  "image": datasets.Image()})
    rows = [{"question": "what color", "label": c, "image": {"bytes": png_bytes((10, 10), c), "path": None}}
            for c in ("red", "blue")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows, features=features),
                          "test": datasets.Dataset.from_list(rows[:1], features=features)}).save_to_disk(tmp_path / "ds")
    options = DataOptions(prompt_field="question", answer_field="label", image_field="image")
    loaded, _ = load_rows(tmp_path / "ds", options=options)
    assert [r.answer for r in loaded] == ["red", "blue"] and loaded[1].images[0].size == (10, 10)
    assert build_messages(loaded[1])[0]["content"][0]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert [r.answer for r in load_rows(tmp_path / "ds", options=DataOptions(**{**vars(options), "split": "test"}))[0]] == ["red"]
    with pytest.raises(ConfigError, match=r"no 'dev' split \(splits: train, test; set data_split\)"):
        load_rows(tmp_path / "ds", options=DataOptions(**{**vars(options), "split": "dev"}))


def test_folder_of_data_files_picks_the_split(images):
    write_rows(images / "train.jsonl", "jsonl", ROWS)
    write_rows(images / "test.jsonl", "jsonl", ROWS[1:2])
    assert summary(load_rows(images)[0]) == EXPECTED
    assert summary(load_rows(images, options=DataOptions(split="test"))[0]) == EXPECTED[1:2]
    with pytest.raises(ConfigError, match=r"no 'validation' data files there \(files for test, train"):
        load_rows(images, options=DataOptions(split="validation"))
    snapshot = images / "snapshot"  # an `hf download` folder: data/train-00000-of-00001.parquet, README.md, ...
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "README.md").write_text("# card")
    write_rows(snapshot / "data" / "train-00000-of-00001.parquet", "parquet", [{**r, "images": []} for r in ROWS])
    assert [r.answer for r in load_rows(snapshot)[0]] == ["red", "blue", "2"]


DEEPSCALER = [{"problem": "Compute $1+1$.", "answer": "2", "solution": "One plus one is two."},
              {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "solution": "Halve."}]


def test_deepscaler_preset_and_field_mapping(tmp_path, capsys):
    path = write_rows(tmp_path / "deepscaler.json", "json", DEEPSCALER)
    with pytest.raises(ConfigError, match=r"deepscaler.json:row 0: neither a 'message' \(LMM-R1\) nor a 'prompt' field "
                                          r"\(row keys: problem, answer, solution"):
        load_rows(path)
    for options in (DataOptions(preset="deepscaler"), DataOptions(prompt_field="problem")):
        rows, _ = load_rows(path, options=options)
        assert [(r.prompt, r.answer, r.meta["solution"]) for r in rows] == [
            (d["problem"], d["answer"], d["solution"]) for d in DEEPSCALER]
    cfg = TrainConfig(data=str(path), data_preset="deepscaler", eval_size=0)
    train, test, report = load_splits(cfg)
    assert sorted(r.answer for r in train) == ["2", "\\frac{1}{2}"] and test == [] and report.rows == 2
    assert main(["data", "validate", str(path), "--data-preset", "deepscaler"]) == 0
    assert "2 rows loaded" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="field 'question' is missing or empty"):  # an explicit field wins
        load_rows(path, options=DataOptions(preset="deepscaler", prompt_field="question"))
    with pytest.raises(ConfigError, match="data_preset must be one of auto, plain, lmmr1, deepscaler"):
        TrainConfig(data_preset="deepscaler_v2")
    with pytest.raises(ConfigError, match="prompt_field"):
        TrainConfig(prompt_field=" ")


def lmmr1_line(content, answer="2", **extra) -> str:
    message = [{"role": "system", "content": "Think."}, {"role": "user", "content": content}]
    return json.dumps({"question": "q", "answer": answer, "message": json.dumps(message), **extra})


def test_lmmr1_presets_and_sokoban_levels(images):
    np = pytest.importorskip("numpy")
    path = images / "vermulti.jsonl"
    path.write_text(lmmr1_line([{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "Find x."}]) + "\n")
    for preset in ("vermulti", "vermulti_geo", "auto"):
        rows, _ = load_rows(path, options=DataOptions(preset=preset))
        assert summary(rows) == [("Find x.", "2", [(16, 12)])] and rows[0].system == "Think."
    plain = write_rows(images / "plain.jsonl", "jsonl", ROWS[1:2])
    with pytest.raises(ConfigError, match=r"plain.jsonl:1: field 'message' is missing"):
        load_rows(plain, options=DataOptions(preset="vermulti"))
    # LMM-R1's Sokoban rows: gym-sokoban's room_state saved with np.save (0 wall 1 floor 2 target 4 box 5 player)
    np.save(images / "level_1.npy", np.array([[0, 0, 0, 0, 0], [0, 5, 4, 2, 0], [0, 0, 0, 0, 0]]))
    sokoban = images / "sokoban.jsonl"
    sokoban.write_text(lmmr1_line([{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "Solve."}],
                                  answer="", env_path="level_1.npy") + "\n"
                       + lmmr1_line([{"type": "text", "text": "Solve."}], answer="") + "\n")
    rows, report = load_rows(sokoban, options=DataOptions(preset="sokoban", on_bad_row="skip"))
    assert rows[0].meta["level"] == "#####/#@$.#/#####" and report.skipped == {"field 'env_path' is missing": 1}
    from lmmr1_lite.rewards import REWARDS
    assert REWARDS["sokoban"](["<think>push</think><answer>right</answer>"], rows[:1]) == [1.0]
    # room_state shows the player over a target: one box more than targets means the player stands on one
    np.save(images / "level_2.npy", np.array([[0, 0, 0, 0, 0, 0], [0, 5, 4, 1, 2, 0], [0, 4, 1, 1, 1, 0], [0] * 6]))
    sokoban.write_text(lmmr1_line([{"type": "text", "text": "Solve."}], answer="", env_path="level_2.npy") + "\n")
    assert load_rows(sokoban, options=DataOptions(preset="sokoban"))[0][0].meta["level"] == "######/#+$ .#/#$   #/######"


def test_images_are_decoded_when_prompts_are_built_and_fitted_lazily(images):
    rows, _ = load_rows(write_rows(images / "t.jsonl", "jsonl", ROWS))
    pil = build_messages(rows[2])[0]["content"][1]["image"]
    assert isinstance(pil, Image.Image) and pil.size == (16, 12) and pil.getpixel((0, 0)) == (255, 0, 0)

    class Tokenizer:  # counts characters: enough to see the image tokens of the fitted size
        def apply_chat_template(self, messages, **_):
            return "".join(str(m["content"]) if isinstance(m["content"], str) else "x" for m in messages)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text)}
    kept = prepare(rows, Tokenizer(), "", max_prompt_tokens=10_000, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    assert all(isinstance(im, ImageRef) for im in kept[0].images), "prepare does not decode images"
    fitted = build_messages(kept[0])[0]["content"][0]["image"]
    assert fitted.size == kept[0].images[0].size and 4 * 28 * 28 <= fitted.size[0] * fitted.size[1] <= 16 * 28 * 28


def test_three_thousand_images_load_under_256_descriptors(tmp_path):
    (tmp_path / "img").mkdir()
    blob = png_bytes((8, 8))
    lines = []
    for i in range(3000):
        (tmp_path / "img" / f"{i}.png").write_bytes(blob)
        lines.append(json.dumps({"prompt": f"max({i},1)", "answer": str(max(i, 1)), "images": [f"img/{i}.png"]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    script = textwrap.dedent(f"""
        import os, resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from lmmr1_lite.data import build_messages, load_rows
        before = len(os.listdir("/proc/self/fd"))
        rows, report = load_rows({str(tmp_path / "train.jsonl")!r})
        messages = [build_messages(r) for r in rows]  # every image decoded into memory, its file closed
        print(report.rows, len(messages), len(os.listdir("/proc/self/fd")) - before)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, n_messages, extra_fds = map(int, done.stdout.split())
    assert rows == n_messages == 3000 and extra_fds <= 2, done.stdout


def test_hub_id_offline_is_one_line_and_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert main(["data", "validate", "lmmr1-lite-tests/no-such-dataset"]) == 2
    code = main(["train", "--data", "lmmr1-lite-tests/no-such-dataset", "--data-split", "train", "--max-steps", "1",
                 "--eval-size", "0", "--output-dir", str(tmp_path / "run")])
    assert code == 2 and time.monotonic() - start < 30  # not transformers' 25-50 s of retries (loaded machine: margin)
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2, errors
    for line in errors:
        assert "data 'lmmr1-lite-tests/no-such-dataset': needs the network or a local copy" in line
        assert "hf download" in line and "save_to_disk" in line
    # without the offline flag, an unreachable Hub is found by one quick probe (stubbed: tests stay offline)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    assert main(["data", "validate", "org/name"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the network or a local copy" in err and "unreachable" in err


def test_hub_id_loads_through_datasets_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo_id, name=None, split=None):
        calls.append((repo_id, name, split))
        return datasets.Dataset.from_list(DEEPSCALER)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no reachability probe: the (fake) cache answers
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = TrainConfig(data="agentica-org/DeepScaleR-Preview-Dataset", data_preset="deepscaler", data_config="default",
                      eval_size=0)
    train, _, report = load_splits(cfg)
    assert calls == [("agentica-org/DeepScaleR-Preview-Dataset", "default", "train")] and report.rows == 2
    bad = [{"problem": "x", "answer": " ", "solution": ""}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(DEEPSCALER + bad))
    with pytest.raises(ConfigError, match=r"^agentica-org/DeepScaleR-Preview-Dataset\[default/train\]:row 2: "
                                          r"field 'answer' is missing or empty"):
        load_splits(cfg)


# name -> (files to write, the data path, the one-line message, reason counted when skipped or None: file-level)
def bad_inputs(tmp: Path) -> dict:
    (tmp / "ok.png").write_bytes(png_bytes())
    (tmp / "bomb.png").write_bytes(bomb_png())
    full = png_bytes((64, 64))
    (tmp / "truncated.png").write_bytes(full[: len(full) // 2])
    good = json.dumps({"prompt": "the circle is red . what color", "answer": "red", "images": ["ok.png"]})

    def jsonl(name, bad_line):
        (tmp / name).write_bytes((good + "\n").encode() * 3 + (bad_line if isinstance(bad_line, bytes) else bad_line.encode())
                                 + b"\n")
        return tmp / name
    (tmp / "empty").mkdir()
    (tmp / "fake.parquet").write_text("this is not parquet")
    (tmp / "object.json").write_text(json.dumps({"data": [json.loads(good)]}, indent=2))
    (tmp / "array.json").write_text(json.dumps([json.loads(good)] * 3 + [["a list"]]))
    image_row = lambda ref: json.dumps({"prompt": "what color", "answer": "red", "images": [ref]})  # noqa: E731
    return {
        "bomb": (jsonl("bomb.jsonl", image_row("bomb.png")),
                 "bomb.jsonl:4: field 'images[0]': image too large (400000000 pixels", "image too large"),
        "truncated": (jsonl("truncated.jsonl", image_row("truncated.png")),
                      "truncated.jsonl:4: field 'images[0]': unreadable image (OSError: image file is truncated",
                      "unreadable image"),
        "missing_image": (jsonl("missing.jsonl", image_row("nope.png")),
                          "missing.jsonl:4: field 'images[0]': image file not found", "image file not found"),
        "latin1": (jsonl("latin1.jsonl", '{"prompt": "caf\xe9?", "answer": "1"}'.encode("latin-1")),
                   "latin1.jsonl:4: not UTF-8 text (byte 0xe9 at column 16)", "not UTF-8 text"),
        "content_number": (jsonl("lmmr1.jsonl", lmmr1_line(7)),
                           "lmmr1.jsonl:4: field 'message[1].content' must be a string or a list of content items, "
                           "got int", "content of the wrong type"),
        "answer_list": (jsonl("answer.jsonl", json.dumps({"prompt": "what color", "answer": ["red"]})),
                        "answer.jsonl:4: field 'answer' must be a string or a number, got list",
                        "field 'answer' of the wrong type"),
        "array_element": (tmp / "array.json", "array.json:row 3: expected a JSON object, got list", "row is not an object"),
        "not_parquet": (tmp / "fake.parquet", "fake.parquet: not a readable parquet file (ArrowInvalid", None),
        "empty_dir": (tmp / "empty", "empty: no data files there", None),
        "json_object": (tmp / "object.json", "object.json: one JSON object (keys: data); expected a JSON array", None),
    }


CASES = ["bomb", "truncated", "missing_image", "latin1", "content_number", "answer_list", "array_element",
         "not_parquet", "empty_dir", "json_object"]


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case, command):
    path, message, _ = bad_inputs(tmp_path)[case]
    argv = (["data", "validate", str(path), "--on-bad-row", "error"] if command == "validate" else
            ["train", "--data", str(path), "--max-steps", "1", "--eval-size", "0", "--output-dir", str(tmp_path / "run")])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


@pytest.mark.parametrize("case", CASES)
def test_bad_input_skipped_and_counted_by_validate(tmp_path, capsys, case):
    path, message, reason = bad_inputs(tmp_path)[case]
    code = main(["data", "validate", str(path), "--on-bad-row", "skip"])
    out, err = capsys.readouterr()
    if reason is None:  # a whole file or folder that cannot be read is an error even when skipping rows
        assert code == 2 and err.strip().count("\n") == 0 and message in err
    else:
        assert code == 0 and not err, err
        assert f"3 rows loaded, 1 skipped (1 {reason})" in out and f"skipped      1  {reason}" in out


def test_train_skips_and_counts_every_bad_row(tmp_path, capsys):
    cases = bad_inputs(tmp_path)
    lines = []
    for case in ("bomb", "truncated", "missing_image", "latin1", "content_number", "answer_list"):
        lines += cases[case][0].read_bytes().splitlines()[-1:]
    good = [json.dumps({"prompt": f"the {s} is red . what color", "answer": "red", "images": ["ok.png"]}).encode()
            for s in ("circle", "square")] * 4
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(good + lines) + b"\n")
    code = main(["train", "--data", str(tmp_path / "mixed.jsonl"), "--on-bad-row", "skip", "--max-steps", "1",
                 "--eval-size", "0", "--instruct-prior-steps", "0", "--prompts-per-step", "2", "--num-generations", "2",
                 "--max-new-tokens", "4", "--output-dir", str(tmp_path / "run")])
    assert code == 0
    out = capsys.readouterr().out
    assert "8 rows loaded, 6 skipped (" in out, out
    for reason in ("image too large", "unreadable image", "image file not found", "not UTF-8 text",
                   "content of the wrong type", "field 'answer' of the wrong type"):
        assert f"1 {reason}" in out, (reason, out)


def test_generate_out_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(["data", "generate", "--task", "arithmetic", "--n", "2", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists and is not a directory" in err and target.read_text() == "keep me"
    assert main(["data", "generate", "--task", "arithmetic", "--n", "2", "--out", str(target / "sub")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
