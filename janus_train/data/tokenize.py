"""Raw samples -> tokenised documents (`packing.Doc`), with the Janus chat format.

  und   BOS + rendered conversation; the image slot is BOI + IMAGE_TOKEN x N + EOI (N from the
        model). Loss on the assistant segments (answer + EOS) only.
  text  BOS + text + EOS, loss on every next token. A chat-JSON text sample renders like und
        without images, loss on the assistant segments.
  gen   BOS + tokens of `gen_prompt(caption)` (ends with <begin_of_image>) + the N VQ codes.
        The BOI position predicts code 0, code k predicts code k+1; no loss on the prompt.

Segments are tokenised one by one (`conversation.render_conversation`), so loss masks follow
segment boundaries exactly; the gen prompt has no loss and is tokenised as one string, exactly
as inference tokenises it. BOS is prepended here from the tokenizer's bos id.

  gen (JanusFlow) BOS + `gen_prompt(caption)` without its final <begin_of_image> + one time
        slot (where DeepSeek's sampler puts the time embedding instead of <begin_of_image>) +
        G latent slots; no CE targets. The document keeps the stored latent posterior; the
        loader draws x1, z0 and t from it (`flow_draw`) when it packs the document.

CFG condition dropout: with probability p, decided by a hash of (seed, sample key) so it is
the same on every rank, worker and resume, a gen prompt keeps BOS and the final
<begin_of_image> and every token between becomes the pad id. That is exactly DeepSeek's
unconditional row at sampling time (`tokens[1:-1] = pad_id`), so the model learns the very
sequence CFG feeds it; an empty caption would instead give "<|User|>: \\n\\n<|Assistant|>:",
which the sampler never shows the model. JanusFlow's sampler instead hides every prompt
position but BOS from the attention (the rows keep their length), so a dropped JanusFlow
document is BOS, time slot, latents with the positions of the full document (Doc.position_skip):
the same attention, position for position, as the sampler's unconditional row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from janus_train.contracts import conversation as conv
from janus_train.data import formats as fmt
from janus_train.contracts.batch import TASK_ID
from janus_train.contracts.batch import Doc
from janus_train.contracts.tokens import TokenizerInfo, conversation_ids
from janus_train.contracts.preprocess import gen_crop, open_rgb, pad_into_chw, und_resize


_GEN = TASK_ID["gen"]


def cfg_dropped(seed: int, key: str, p: float) -> bool:
    """Whether sample `key`'s caption is dropped; a pure function of (seed, key)."""
    if p <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64 < p


def flow_draw(
    seed: int, key: str, pos: tuple[int, int], latent: np.ndarray, scale: float, t_mean: float = 0.0, t_std: float = 1.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """(x1, z0, t) for one use of a JanusFlow gen sample: x1 = (mean + std * eps) * scale from
    the stored posterior `latent` ([2, C, h, w]), noise z0 ~ N(0, 1), t = sigmoid(N(t_mean,
    t_std)). A pure function of (seed, key, stream position): the same on every rank layout
    that reads the sample at the same position, on resume, and different at every epoch."""
    h = hashlib.blake2b(f"{seed}\0{key}\0{pos[0]}\0{pos[1]}".encode(), digest_size=8).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(h, "little")))
    mean, std = latent[0].astype(np.float32), latent[1].astype(np.float32)
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    x1 = (mean + std * eps) * np.float32(scale)
    z0 = rng.standard_normal(mean.shape, dtype=np.float32)
    t = 1.0 / (1.0 + np.exp(-(t_mean + t_std * rng.standard_normal())))
    return x1, z0, float(t)


@dataclass
class DocBuilder:
    """Turns one raw sample of a task into a Doc; raises formats.SampleError to skip it."""

    tok: TokenizerInfo
    seq_len: int
    num_image_tokens: int  # und tokens per image
    image_size: int  # und image side
    num_gen_tokens: int | None = None  # codes per gen image (checked when given)
    codebook_size: int | None = None
    seed: int = 0
    cfg_dropout: float = 0.1
    truncation: str = "truncate"
    system_prompt: str | None = conv.DEFAULT_SYSTEM_PROMPT
    jpeg_draft: bool = False
    gen_kind: str = "vq"  # "vq": codes (Janus-Pro); "flow": VAE latents (JanusFlow)
    latent_shape: tuple[int, int, int] | None = None  # flow: [C, h, w] the model takes
    repa_image: bool = False  # flow: keep each gen image (at `image_size`) for REPA

    @property
    def gen_pixels(self) -> bool:
        """Whether gen documents carry an image (decoded into the batch's pixel buffer)."""
        return self.gen_kind == "flow" and self.repa_image

    def __post_init__(self) -> None:
        if self.gen_kind not in ("vq", "flow"):
            raise ValueError(f"gen_kind={self.gen_kind!r} is not one of vq|flow")
        if self.gen_kind == "flow" and (self.num_gen_tokens is None or self.latent_shape is None):
            raise ValueError("JanusFlow gen documents need num_gen_tokens and latent_shape")
        self._cache: dict[str, list[int]] = {}
        self._gen_template: np.ndarray | None = None

    def _ids(self, text: str, cache: bool) -> list[int]:
        if not cache:
            return self.tok.encode(text)
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text)
            if len(self._cache) < 1024:
                self._cache[text] = ids
        return ids

    # ---- conversations (und, chat text) ---------------------------------------------------
    def _conversation(self, segments: list[conv.Segment]) -> tuple[list[int], list[bool]]:
        # Template pieces ("<|User|>: ", "\n\n", the system prompt) repeat: cache them.
        return conversation_ids(
            self.tok, segments, self.num_image_tokens, encode=lambda seg: self._ids(seg.text, cache=not seg.loss and len(seg.text) < 512)
        )

    def _finish_text_like(self, key: str, task: str, ids: list[int], target: list[bool], protect: int = 0) -> Doc:
        """Apply the length rule; `protect` = tokens that must stay whole (the image slot)."""
        if len(ids) > self.seq_len:
            keeps_target = any(target[protect : self.seq_len])
            if self.truncation == "drop" or protect > self.seq_len or not keeps_target:
                raise fmt.SampleError("too_long", f"{len(ids)} tokens > seq_len {self.seq_len}")
            ids, target = ids[: self.seq_len], target[: self.seq_len]
        arr = np.asarray(ids, dtype=np.int32)
        return Doc(key=key, task=TASK_ID[task], ids=arr, target=np.asarray(target, dtype=bool), gen_start=len(arr))

    def und(self, key: str, parts: dict[str, bytes], pixel_out: np.ndarray | None = None) -> Doc:
        """`pixel_out`: a uint8 [3, S, S] buffer to write the padded image into (the decode
        workers pass a slot of the shared-memory batch buffer); allocated if None."""
        obj = fmt.parse_json(parts.get("json"))
        turns = fmt.get_conversation(obj)
        raw = fmt.image_part(parts)
        if raw is None:
            raise fmt.SampleError("missing_key", "und sample has no image part")
        slots = sum(t["content"].count(conv.IMAGE_SLOT) for t in turns)
        if any(conv.IMAGE_SLOT in t["content"] for t in turns if t["role"] == "assistant"):
            raise fmt.SampleError("bad_conversation", "image slot in an assistant turn")
        if slots == 0:
            first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
            if first_user is None:
                raise fmt.SampleError("bad_conversation", "no user turn")
            turns[first_user] = {"role": "user", "content": conv.IMAGE_SLOT + "\n" + turns[first_user]["content"]}
        elif slots > 1:
            raise fmt.SampleError("bad_conversation", f"{slots} image slots for 1 image")
        try:
            img = open_rgb(raw, self.image_size if self.jpeg_draft else None)
            resized = und_resize(img, self.image_size)
        except Exception as e:  # PIL raises many types for bad data
            raise fmt.SampleError("bad_image", f"{type(e).__name__}: {e}"[:200]) from None
        system = obj.get("system", self.system_prompt)
        try:
            segments = conv.render_conversation(turns, self.num_image_tokens, system=system or None)
        except ValueError as e:
            raise fmt.SampleError("bad_conversation", str(e)) from None
        ids, target = self._conversation(segments)
        n_img = ids.count(self.tok.image_id)
        if n_img != self.num_image_tokens:
            # e.g. a literal "<image_placeholder>" in the text would desync images and slots
            raise fmt.SampleError("bad_conversation", f"{n_img} image tokens, expected {self.num_image_tokens}")
        slot_end = ids.index(self.tok.eoi_id) + 1
        doc = self._finish_text_like(key, "und", ids, target, protect=slot_end)
        if pixel_out is None:
            pixel_out = np.empty((3, self.image_size, self.image_size), dtype=np.uint8)
        doc.pixels = pad_into_chw(resized, pixel_out)[None]  # uint8 [1, 3, S, S]
        return doc

    def text(self, key: str, parts: dict[str, bytes]) -> Doc:
        if "txt" in parts:
            try:
                text = parts["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise fmt.SampleError("bad_text", str(e)[:200]) from None
            obj = None
        else:
            obj = fmt.parse_json(parts.get("json"))
            text = obj.get("text")
        if obj is not None and text is None:
            turns = fmt.get_conversation(obj)
            if any(conv.IMAGE_SLOT in t["content"] for t in turns):
                raise fmt.SampleError("bad_conversation", "image slot in a text sample")
            segments = conv.render_conversation(turns, 0, system=obj.get("system"))
            ids, target = self._conversation(segments)
            return self._finish_text_like(key, "text", ids, target)
        if not isinstance(text, str) or not text.strip():
            raise fmt.SampleError("empty_text", "no text")
        body = self.tok.encode(text)
        ids = [self.tok.bos_id] + body + [self.tok.eos_id]
        target = [False] + [True] * (len(body) + 1)
        return self._finish_text_like(key, "text", ids, target)

    # ---- generation -------------------------------------------------------------------------
    def _gen_prompt(self, obj: dict, caption: str, parts: dict[str, bytes]) -> np.ndarray | list[int]:
        """The gen prompt's ids without BOS, ending with <begin_of_image>."""
        stored = parts.get(fmt.PROMPT_IDS_PART)
        if stored is not None and obj.get("prompt_tokenizer") == self.tok.fingerprint:
            return fmt.load_npy(stored)
        return self.tok.encode(conv.gen_prompt(caption))

    def gen(self, key: str, parts: dict[str, bytes], pixel_out: np.ndarray | None = None) -> Doc:
        if self.gen_kind == "flow":
            return self.gen_flow(key, parts, pixel_out)
        obj = fmt.parse_json(parts.get("json"))
        caption = fmt.get_caption(obj)
        raw_codes = parts.get(fmt.CODES_PART)
        if raw_codes is None:
            raise fmt.SampleError("missing_key", "gen sample has no codes.npy (run data_pipelines.pretokenize_vq)")
        codes = fmt.load_npy(raw_codes)
        if codes.ndim != 1 or codes.dtype.kind not in "iu":
            raise fmt.SampleError("bad_codes", f"codes must be a 1-d integer array, got {codes.dtype}{list(codes.shape)}")
        n_codes = codes.shape[0]
        if self.num_gen_tokens is not None and n_codes != self.num_gen_tokens:
            raise fmt.SampleError("bad_codes", f"{n_codes} codes, the model uses {self.num_gen_tokens}")
        if self.codebook_size is not None and n_codes:
            # unsigned codes (what pretokenize_vq writes) need only the max check
            if codes.max() >= self.codebook_size or (codes.dtype.kind == "i" and codes.min() < 0):
                raise fmt.SampleError("bad_codes", f"codes outside [0, {self.codebook_size})")
        prompt = self._gen_prompt(obj, caption, parts)
        n_prompt = 1 + len(prompt)
        n = n_prompt + n_codes
        if n > self.seq_len:
            raise fmt.SampleError("too_long", f"{n} tokens > seq_len {self.seq_len} (gen documents are never cut)")
        ids = np.empty(n, dtype=np.int32)
        ids[0] = self.tok.bos_id
        ids[1:n_prompt] = prompt
        ids[n_prompt:] = codes
        if int(ids[n_prompt - 1]) != self.tok.boi_id:
            raise fmt.SampleError("bad_codes", "the gen prompt does not end with <begin_of_image>")
        if self.cfg_dropout > 0 and cfg_dropped(self.seed, key, self.cfg_dropout):
            ids[1 : n_prompt - 1] = self.tok.pad_id
        return Doc(key=key, task=_GEN, ids=ids, target=self._gen_target(n_prompt, n), gen_start=n_prompt)

    def gen_flow(self, key: str, parts: dict[str, bytes], pixel_out: np.ndarray | None = None) -> Doc:
        obj = fmt.parse_json(parts.get("json"))
        caption = fmt.get_caption(obj)
        raw_mean, raw_std = parts.get(fmt.LATENT_MEAN_PART), parts.get(fmt.LATENT_STD_PART)
        if raw_mean is None or raw_std is None:
            raise fmt.SampleError("missing_key", "gen sample has no latent_mean.npy/latent_std.npy (run data_pipelines.pretokenize_vae)")
        mean, std = fmt.load_npy(raw_mean), fmt.load_npy(raw_std)
        want = tuple(self.latent_shape)
        if mean.shape != want or std.shape != want:
            raise fmt.SampleError("bad_latent", f"latent mean {list(mean.shape)} / std {list(std.shape)}, the model takes {list(want)}")
        latent = np.stack([mean, std]).astype(np.float16)
        if not np.isfinite(latent).all() or (latent[1] < 0).any():
            raise fmt.SampleError("bad_latent", "non-finite latent or negative std")
        prompt = self._gen_prompt(obj, caption, parts)
        if len(prompt) == 0 or int(prompt[-1]) != self.tok.boi_id:
            raise fmt.SampleError("bad_codes", "the gen prompt does not end with <begin_of_image>")
        g = self.num_gen_tokens
        time_at = len(prompt)  # BOS + prompt without its <begin_of_image>
        n = time_at + 1 + g
        if n > self.seq_len:
            raise fmt.SampleError("too_long", f"{n} positions > seq_len {self.seq_len} (gen documents are never cut)")
        pixels = None
        if self.repa_image:
            raw = fmt.image_part(parts)
            if raw is None:
                raise fmt.SampleError(
                    "missing_key", "gen sample has no image, which representation alignment needs (rebuild without "
                    "--drop-image, or set model.overrides.flow.repa_weight=0)"
                )
            try:
                crop = gen_crop(open_rgb(raw, self.image_size if self.jpeg_draft else None), self.image_size)
            except Exception as e:  # PIL raises many types for bad data
                raise fmt.SampleError("bad_image", f"{type(e).__name__}: {e}"[:200]) from None
            if pixel_out is None:
                pixel_out = np.empty((3, self.image_size, self.image_size), dtype=np.uint8)
            pixel_out[...] = crop.transpose(2, 0, 1)
            pixels = pixel_out[None]
        latent_ids = np.full(g + 1, self.tok.image_id, dtype=np.int32)
        latent_ids[0] = self.tok.boi_id  # the time slot: where the sampler drops <begin_of_image>
        if self.cfg_dropout > 0 and cfg_dropped(self.seed, key, self.cfg_dropout):
            ids = np.concatenate([np.asarray([self.tok.bos_id], np.int32), latent_ids])
            skip, gen_start = time_at - 1, 1
        else:
            ids = np.concatenate([np.asarray([self.tok.bos_id], np.int32), np.asarray(prompt[:-1], np.int32), latent_ids])
            skip, gen_start = 0, time_at
        return Doc(key=key, task=_GEN, ids=ids, target=np.zeros(ids.shape[0], dtype=bool), gen_start=gen_start, pixels=pixels,
                   position_skip=skip, latent=latent)

    def _gen_target(self, n_prompt: int, n: int) -> np.ndarray:
        """False for the prompt, True for the codes: a read-only view of one shared template,
        since every gen document's mask has this shape (saves an allocation per sample)."""
        t = self._gen_template
        if t is None or n - n_prompt > t.shape[0] - self.seq_len:
            t = np.zeros(self.seq_len + max(n - n_prompt, self.num_gen_tokens or 0), dtype=bool)
            t[self.seq_len :] = True
            t.flags.writeable = False
            self._gen_template = t
        return t[self.seq_len - n_prompt : self.seq_len - n_prompt + n]

    def build(self, task: str, key: str, parts: dict[str, bytes], pixel_out: np.ndarray | None = None) -> Doc:
        if task == "und":
            return self.und(key, parts, pixel_out)
        if task == "text":
            return self.text(key, parts)
        if task == "gen":
            return self.gen(key, parts, pixel_out)
        raise ValueError(f"unknown task {task!r}")
