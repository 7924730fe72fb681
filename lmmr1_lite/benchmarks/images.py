"""Images of benchmark rows, in the forms rows publish them, opened only when used.

A row holds an image as a PIL image (`datasets` with decoding on), a dict `{"bytes": ..., "path": ...}`
(how `datasets` stores an Image column in parquet, and what `Image(decode=False)` yields), or a path
string relative to the dataset's folder (MathVista's and MathVision's `image` column: "images/1.jpg").
`decode` returns a fully decoded RGB copy and closes the file, so a list of a few thousand rows keeps
no file descriptor and no decoded pixels alive; `LazyImages` decodes on each access.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from ..data import open_image


def present(ref) -> bool:
    """Whether a row's image cell holds an image (None, "" and an empty dict do not)."""
    if ref is None or (isinstance(ref, str) and not ref.strip()):
        return False
    if isinstance(ref, dict):
        return bool(ref.get("bytes") or ref.get("path"))
    return True


def decode(ref, base_dir: str | Path = "."):
    """A fully loaded RGB PIL image from any of the published forms; the source file is closed."""
    from PIL import Image

    if isinstance(ref, dict):
        if ref.get("bytes"):
            with Image.open(io.BytesIO(ref["bytes"])) as image:
                return image.convert("RGB")
        ref = ref.get("path")
    if hasattr(ref, "convert") and hasattr(ref, "size"):
        return ref.convert("RGB")  # convert() loads the pixels and returns a copy
    with open_image(ref, Path(base_dir)) as image:  # a path, file:// or data: URI; ValueError when unreadable
        return image.convert("RGB")


class LazyImages(Sequence):
    """A row's images as a sequence that decodes each image when it is read (never cached).

    It stands in for `Example.images`: `len`, iteration and indexing give PIL images, and
    `data.prepare` replaces it with a plain list of resized images when a run prepares its prompts."""

    def __init__(self, refs: list, base_dir: str | Path = "."):
        self.refs, self.base_dir = list(refs), Path(base_dir)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [decode(ref, self.base_dir) for ref in self.refs[index]]
        return decode(self.refs[index], self.base_dir)

    def __repr__(self) -> str:
        return f"LazyImages({len(self.refs)} image(s))"
