"""Task generators, data loaders (good and broken files), images and chat messages."""
import base64
import io
import json

import pytest
from PIL import Image

from lmmr1_lite import models, rewards, sokoban
from lmmr1_lite.cli import main
from lmmr1_lite.config import TINY_MODEL_DIR, ConfigError
from lmmr1_lite.data import Example, build_messages, fit_pixels, load_rows, prepare
from lmmr1_lite.tasks import COLORS, IMAGE_TASKS, TASKS, generate


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_are_deterministic_held_out_and_verified(task):
    train, test = generate(task, 30, 8, seed=3, level=2)
    again, again_test = generate(task, 30, 8, seed=3, level=2)
    assert [(e.prompt, e.answer) for e in train] == [(e.prompt, e.answer) for e in again]
    assert [(e.prompt, e.answer) for e in test] == [(e.prompt, e.answer) for e in again_test]
    if task in IMAGE_TASKS:
        assert all(len(e.images) == 1 and e.images[0].size[0] >= 100 for e in train)
        assert train[0].images[0].tobytes() == again[0].images[0].tobytes()
    other, _ = generate(task, 30, 8, seed=4, level=2)
    assert [(e.prompt, e.answer) for e in other] != [(e.prompt, e.answer) for e in train]
    from lmmr1_lite.tasks import _key
    assert not {_key(e) for e in test} & {_key(e) for e in train}, "test problems must be held out"
    for e in train + test:  # the gold answer, well formatted, earns full reward from its own verifier
        if task == "sokoban":
            completion = f"<think>plan</think><answer>{e.meta['solution']}</answer>"
            assert rewards.REWARDS["sokoban"]([completion, "<think></think><answer>up</answer>"], [e, e]) == [1.0, 0.0]
        else:
            completion = f"<think>work</think><answer>{e.answer}</answer>"
            assert rewards.accuracy_reward(completion, e.answer) == 1.0, (e.prompt, e.answer)


def test_tiny_task_answers_are_right():
    for e in generate("tiny_compare", 200, 10, seed=0)[0]:
        a, b = int(e.prompt[0]), int(e.prompt[2])
        assert e.answer == ("yes" if a < b else "no")
    for e in generate("tiny_max", 200, 10, seed=0)[0]:
        a, b = map(int, e.prompt[4:-1].split(","))
        assert e.answer == str(max(a, b))
    _, test = generate("tiny_compare", 10, 100, seed=0)
    assert len({e.prompt for e in test}) == 20, "the tiny tasks hold out 20 of their 100 problems"
    tokenizer = models.load_tokenizer(str(TINY_MODEL_DIR))
    train, test = generate("tiny_color_text", 300, 100, seed=0)
    for e in train:
        named = [w for w in e.prompt.split() if w in COLORS]
        assert named == [e.answer], e.prompt
        assert tokenizer.unk_token_id not in tokenizer.encode(e.prompt), "every word is in the tiny vocabulary"
    assert len({e.prompt for e in test}) == 12 and len({e.prompt for e in train}) == 48, "60 problems, a fifth held out"


def test_sokoban_simulator_and_moves():
    level = "#####/#@$.#/#####"
    assert sokoban.play(level, ["right"]) and not sokoban.play(level, ["left"])
    assert sokoban.parse_moves("Right, up") == ["right", "up"] and sokoban.parse_moves("RRU") == ["right", "right", "up"]
    assert sokoban.parse_moves("right jump") is None
    assert sokoban.solve(level) == ["right"]
    assert sokoban.solves("<answer>R</answer>", level) == 1.0
    assert sokoban.solves("<answer>R jump</answer>", level) == 0.0


def png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def lmmr1_row(image_ref=None, answer="$\\boxed{60}$", text="Find x.") -> str:
    content = ([{"type": "image", "image": image_ref}] if image_ref else []) + [{"type": "text", "text": text}]
    message = [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": content}]
    return json.dumps({"question": text, "answer": answer, "message": json.dumps(message)})


def test_lmmr1_jsonl_with_path_file_uri_and_base64_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    data_uri = "data:image/png;base64," + base64.b64encode(png_bytes((20, 20))).decode()
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([lmmr1_row("img/a.png"), lmmr1_row(f"file://{tmp_path}/img/a.png"),
                               lmmr1_row(data_uri), lmmr1_row(None, answer="12")]) + "\n")
    rows, report = load_rows(path)
    assert report.rows == 4 and not report.skipped
    assert [len(r.images) for r in rows] == [1, 1, 1, 0] and rows[2].images[0].size == (20, 20)
    assert rows[0].system == "Think step by step." and rows[0].prompt == "Find x." and rows[3].answer == "12"
    messages = build_messages(rows[0], "ignored: the row has its own")
    assert messages[0]["content"] == "Think step by step." and messages[1]["content"][0]["type"] == "image"


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad.jsonl:2: invalid JSON"),
    (json.dumps({"prompt": "1+1"}), r"bad.jsonl:2: field 'answer' is missing or empty"),
    (json.dumps({"prompt": "", "answer": "2"}), r"bad.jsonl:2: field 'prompt' is missing or empty"),
    (json.dumps({"prompt": "x", "answer": "2", "images": ["nope.png"]}), r"bad.jsonl:2: field 'images\[0\]': image file not found"),
    (json.dumps({"prompt": "x", "answer": "2", "images": ["broken.png"]}), r"bad.jsonl:2: field 'images\[0\]': unreadable image"),
    (json.dumps({"prompt": "x", "answer": "2", "images": [3]}), r"field 'images\[0\]': unsupported image reference"),
    (json.dumps({"message": "[{]", "answer": "1"}), r"bad.jsonl:2: field 'message' is not valid JSON"),
    (json.dumps({"message": json.dumps([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]),
                 "answer": "1"}), r"unsupported content type 'video'"),
    (json.dumps({"question": "q"}), r"bad.jsonl:2: neither a 'message' \(LMM-R1\) nor a 'prompt' field"),
    (json.dumps({"message": json.dumps([{"role": "user", "content": 3}]), "answer": "1"}),
     r"bad.jsonl:2: field 'message\[0\].content' must be a string or a list of content items, got int"),
    (json.dumps({"message": json.dumps([{"role": "user", "content": [{"type": "text", "text": 5}]}]), "answer": "1"}),
     r"bad.jsonl:2: field 'message\[0\].content\[0\].text' must be a string, got int"),
    (json.dumps({"message": json.dumps(["hi"]), "answer": "1"}), r"bad.jsonl:2: field 'message\[0\]' must be an object"),
    (json.dumps({"message": json.dumps([{"role": "user", "content": [{"type": "image"}, "x"]}]), "answer": "1"}),
     r"bad.jsonl:2: field 'message\[0\].content\[0\].image' is missing"),
    (json.dumps({"prompt": "x", "answer": ["2"]}), r"bad.jsonl:2: field 'answer' must be a string or a number, got list"),
    (json.dumps({"prompt": 7, "answer": "2"}), r"bad.jsonl:2: field 'prompt' must be a string, got int"),
    (json.dumps({"prompt": "x", "answer": "2", "images": 4}), r"bad.jsonl:2: field 'images' must be an image reference"),
    ("[1, 2]", r"bad.jsonl:2: expected a JSON object, got list"),
])
def test_broken_rows_name_file_row_and_field(tmp_path, line, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_rows(bad)
    assert "\n" not in str(err.value)
    rows, report = load_rows(bad, on_bad_row="skip")
    assert len(rows) == 1 and sum(report.skipped.values()) == 1, "a skipped row is counted, not silently dropped"


def test_unparseable_gold_answers_are_skipped_and_counted(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "p", "answer": a}) for a in ["3", "\\frac{1}{2}", "\\frac{", "}{"]) + "\n")
    rows, report = load_rows(path)
    assert [r.answer for r in rows] == ["3", "\\frac{1}{2}"] and report.skipped["gold answer not parseable"] == 2


def test_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "1+1", "answer": "2"}, {"prompt": "2+3", "answer": "5"}]).save_to_disk(tmp_path / "ds")
    rows, report = load_rows(tmp_path / "ds")
    assert [r.answer for r in rows] == ["2", "5"] and report.rows == 2


@pytest.mark.parametrize("size", [(10, 10), (40, 30), (3000, 2000), (5000, 20)])
def test_fit_pixels_bounds(size):
    low, high = 56 * 56, 448 * 448
    out = fit_pixels(Image.new("RGB", size), low, high)
    assert low <= out.size[0] * out.size[1] <= high
    ratio_in, ratio_out = size[0] / size[1], out.size[0] / out.size[1]
    assert abs(ratio_out - ratio_in) / ratio_in < 0.2 or min(out.size) <= 2


def test_over_long_prompts_are_skipped_not_truncated(tiny_policy):
    _, tokenizer, _ = tiny_policy
    from lmmr1_lite.data import LoadReport
    short = Example("max(1,2)", "2")
    with_image = Example("what color", "red", [Image.new("RGB", (224, 224))])  # 64 image tokens
    report = LoadReport()
    kept = prepare([short, with_image], tokenizer, "", max_prompt_tokens=40, min_pixels=56 * 56,
                   max_pixels=224 * 224, report=report)
    assert kept == [short] and report.skipped["prompt longer than max_prompt_tokens"] == 1


def test_data_cli_generate_then_validate(tmp_path, capsys):
    out = tmp_path / "geo"
    assert main(["data", "generate", "--task", "geometry", "--n", "6", "--seed", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((out / r["images"][0]).is_file() for r in rows)
    assert main(["data", "validate", str(out / "train.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "6 rows loaded" in printed and "images: 6 in 6 rows" in printed and "prompt tokens" in printed
    assert main(["data", "generate", "--task", "geometry", "--n", "6", "--out", str(out)]) == 2, "never overwrites"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["data", "validate", str(bad), "--on-bad-row", "error"]) == 2
    assert "bad.jsonl:1: field 'answer'" in capsys.readouterr().err


def test_lmmr1_prompt_is_the_default_and_configurable():
    from lmmr1_lite.config import TrainConfig
    cfg = TrainConfig()
    assert "<think>" in cfg.system_prompt and "</answer>" in cfg.system_prompt
    messages = build_messages(Example("1+1", "2"), cfg.system_prompt, "Question: {prompt}")
    assert messages[0] == {"role": "system", "content": cfg.system_prompt}
    assert messages[1] == {"role": "user", "content": "Question: 1+1"}
    with pytest.raises(ConfigError, match="prompt_template"):
        TrainConfig(prompt_template="no placeholder")
