"""Image parts of chat messages (OpenAI's `image_url` parts): found, decoded and checked against
the limits before anything reaches the engine, then the rendered prompt's placeholders expanded by
the model's processor. Every problem is a 400 naming the part; nothing here touches the engine."""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..engine.mm_inputs import MultiModalInputs
from ..vision_processor import ImageError, ImageLimits, VisionProcessor, open_image
from .errors import invalid_param
from .protocol import ChatMessage

INLINE_ONLY = ("image URLs are not fetched by this server (no --allowed-media-domains); send the image inline "
               "as a base64 data URL (data:image/png;base64,...)")


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, Any]]:
    """(the part's parameter path, its URL) of every image part, in conversation order."""
    found = []
    for i, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                value = part.get("image_url")
                url = value.get("url") if isinstance(value, dict) else value
                found.append((f"messages[{i}].content[{j}].image_url", url))
    return found


def decode_data_url(url: Any, param: str, limits: ImageLimits) -> bytes:
    """The bytes of a `data:image/...;base64,` URL; 400 for anything else or anything too large."""
    if not isinstance(url, str) or not url:
        raise invalid_param(param, "an image_url part needs {\"url\": \"data:image/...;base64,...\"}")
    if url.startswith(("http://", "https://")):
        if not limits.allowed_domains:
            raise invalid_param(param, INLINE_ONLY)
        return fetch_image(url, param, limits)
    header, sep, payload = url.partition(",")
    mime = header.removeprefix("data:").split(";")[0]
    if not header.startswith("data:") or not sep or not header.endswith(";base64") or not mime.startswith("image/"):
        raise invalid_param(param, f"the URL must be a base64 data URL of an image (data:image/png;base64,...); got "
                            f"{url[:40]!r}")
    if len(payload) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise invalid_param(param, f"the image is over {limits.max_bytes} bytes, the most allowed "
                            "(--max-image-bytes)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid_param(param, f"the data URL's payload is not valid base64: {exc}") from exc


def is_allowed(url: str, domains: tuple[str, ...]) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (d.lower().strip(".") for d in domains))


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed domain (else the allowlist could be walked around)."""

    def __init__(self, domains: tuple[str, ...]) -> None:
        self.domains = domains

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not is_allowed(newurl, self.domains) or not newurl.startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirected to {newurl}, outside --allowed-media-domains")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(url: str, param: str, limits: ImageLimits) -> bytes:
    """An image URL's bytes (in a worker thread): only from --allowed-media-domains, at most
    --max-image-bytes, within --media-fetch-timeout; 400 naming the part otherwise."""
    if not is_allowed(url, limits.allowed_domains):
        raise invalid_param(param, f"{urllib.parse.urlsplit(url).hostname!r} is not in --allowed-media-domains "
                            f"({', '.join(limits.allowed_domains)}); send the image inline as a base64 data URL")
    opener = urllib.request.build_opener(_AllowedRedirects(limits.allowed_domains))
    try:
        with opener.open(urllib.request.Request(url, headers={"Accept": "image/*"}), timeout=limits.fetch_timeout) as r:
            data = bytes(r.read(limits.max_bytes + 1))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise invalid_param(param, f"the image could not be fetched: {getattr(exc, 'reason', exc)}") from exc
    if len(data) > limits.max_bytes:
        raise invalid_param(param, f"the image is over {limits.max_bytes} bytes, the most allowed (--max-image-bytes)")
    return data


def _decode_all(urls: list[tuple[str, Any]], limits: ImageLimits) -> list[Any]:
    images = []
    for param, url in urls:
        try:
            images.append(open_image(decode_data_url(url, param, limits), limits, "the image"))
        except ImageError as exc:
            raise invalid_param(param, str(exc)) from exc
    return images


async def chat_images(vision: VisionProcessor | None, model: str, messages: list[ChatMessage]) -> list[Any]:
    """The conversation's images, decoded (in a worker thread) and checked; 400 for a text-only
    model, too many images or a bad one. Empty when the conversation has none."""
    urls = image_urls(messages)
    if not urls:
        return []
    if vision is None:
        raise invalid_param(urls[0][0], f"model {model!r} takes text only (served without an image encoder), so "
                            "image parts cannot be used; serve an image-text model (such as Qwen2.5-VL) to send images")
    limit = vision.limits.max_images
    if len(urls) > limit:
        raise invalid_param("messages", f"the conversation has {len(urls)} images; at most {limit} are allowed "
                            "per request (--limit-mm-per-prompt)")
    return await asyncio.to_thread(_decode_all, urls, vision.limits)


async def expand_images(vision: VisionProcessor, prompt_ids: list[int],
                        images: list[Any]) -> tuple[list[int], MultiModalInputs]:
    """The prompt with each image's placeholder expanded, and the images' engine inputs."""
    try:
        return await asyncio.to_thread(vision.expand, prompt_ids, images)
    except ImageError as exc:  # an image the model cannot take (a size its patch grid cannot hold)
        raise invalid_param("messages", str(exc)) from exc
    except ValueError as exc:  # the template rendered another number of placeholders than images
        raise invalid_param("messages", f"{exc}; does the chat template render image parts?") from exc
