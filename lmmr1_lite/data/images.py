"""Images a row names: decoded once at load to check them (a truncated or oversized image is a bad row),
then kept as an `ImageRef` (the path or the encoded bytes, and the size), decoded again only when a
prompt is built; resizing into [min_pixels, max_pixels]."""
from __future__ import annotations

import base64
import io
import re
import warnings
from pathlib import Path


class BadImage(ValueError):
    """An image a row names cannot be used; `reason` is the short form skipped rows are counted by."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f" {detail}" if detail.startswith("(") else f": {detail}" if detail else ""))
        self.reason = reason


class ImageRef:
    """A checked image kept by reference: `source` is a file path or the encoded bytes, `size` its
    (width, height), after `fit_pixels` the size it is resized to. `open()` decodes a fresh PIL image
    and closes the file at once, so rows hold no file descriptors and no decoded pixels."""
    __slots__ = ("source", "size", "resize")

    def __init__(self, source: Path | bytes, size: tuple[int, int], resize: tuple[int, int] | None = None):
        self.source, self.size, self.resize = source, tuple(resize or size), resize

    def open(self):
        try:
            image = _decode(self.source)[0]
        except BadImage as err:  # the file changed after it was checked at load time
            raise ValueError(f"{self!r}: {err}") from None
        return image.convert("RGB").resize(self.resize) if self.resize else image

    def __repr__(self) -> str:
        where = str(self.source) if isinstance(self.source, Path) else f"<{len(self.source)} bytes>"
        return f"ImageRef({where}, size={self.size})"


def _too_large(pixels: int, limit: int) -> BadImage:
    return BadImage("image too large", f"({pixels} pixels; the limit is {limit}, PIL.Image.MAX_IMAGE_PIXELS)")


_BOMB_FILTER = False


def _decode(source: Path | bytes, keep: bool = True):
    """(PIL image fully decoded in memory or None when not `keep`, (width, height)); the file is closed
    on return. Anything wrong with the image raises BadImage."""
    from PIL import Image

    global _BOMB_FILTER
    if not _BOMB_FILTER:  # PIL's over-the-limit warning becomes an error (a bad row), not a stderr line;
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)  # once: threads decode
        _BOMB_FILTER = True
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if width * height > limit:
                raise _too_large(width * height, limit)
            image.load()  # a truncated or corrupt file fails here, not in the middle of a training step
            return (image.copy() if keep else None), (width, height)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(int(found.group(1)) if found else 0, limit) from None
    except FileNotFoundError:
        raise BadImage("image file not found", str(source)) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for broken files
        detail = str(err).splitlines()[0][:120] if str(err) else ""
        raise BadImage("unreadable image", f"({type(err).__name__}{': ' + detail if detail else ''})") from None


def image_source(ref, base_dir: Path) -> Path | bytes:
    """The file path or encoded bytes an image reference names: a path (relative to `base_dir`), a
    file:// URI, a base64 data: URI, bytes, or a Hugging Face Image value {"bytes", "path"}."""
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)) and ref:
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise BadImage("unsupported image reference", f"of type {type(ref).__name__}"
                       if not isinstance(ref, str) else "empty string")
    if ref.startswith("data:"):
        try:
            return base64.b64decode(ref.partition(",")[2], validate=True)
        except ValueError:
            raise BadImage("unreadable image", "(invalid base64 in a data: URI)") from None
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise BadImage("image file not found", str(path))
    return path


def check_image(ref, base_dir: Path):
    """Decode the image once (every pixel, so a truncated file is caught) and return an `ImageRef` to
    it; a PIL image passes through unchanged. Raises BadImage."""
    if hasattr(ref, "size") and hasattr(ref, "convert"):
        return ref
    source = image_source(ref, base_dir)
    return ImageRef(source, _decode(source, keep=False)[1])


def open_image(ref, base_dir: Path):
    """A PIL image, decoded into memory with its file closed, from any reference `image_source` takes,
    an `ImageRef` or a PIL image. Raises ValueError (BadImage) naming the problem."""
    if isinstance(ref, ImageRef):
        return ref.open()
    if hasattr(ref, "size") and hasattr(ref, "convert"):
        return ref
    return _decode(image_source(ref, base_dir))[0]


def resolve_images(images: list) -> list:
    """PIL images for a prompt: `ImageRef`s are decoded now (and resized if `fit_pixels` said so)."""
    return [image.open() if isinstance(image, ImageRef) else image for image in images]


def _fit_size(size: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int] | None:
    width, height = size
    area = width * height
    if min_pixels <= area <= max_pixels:
        return None
    scale = ((max_pixels if area > max_pixels else min_pixels) / area) ** 0.5
    new = (max(1, int(width * scale)), max(1, int(height * scale)))
    if area < min_pixels:  # rounding down could leave it just under the floor
        while new[0] * new[1] < min_pixels:
            new = (new[0] + 1, new[1] + (new[1] < new[0]))
    return new


def fit_pixels(image, min_pixels: int, max_pixels: int):
    """Resize (keeping the aspect ratio) so that min_pixels <= width * height <= max_pixels. An
    `ImageRef` is not decoded: the returned ref resizes when it is opened."""
    new = _fit_size(image.size, min_pixels, max_pixels)
    if new is None:
        return image
    return ImageRef(image.source, image.size, new) if isinstance(image, ImageRef) else image.convert("RGB").resize(new)
