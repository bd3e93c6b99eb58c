"""Images in: the tiny projector (tests/ggufgen.py) through real libmtmd, and the API end to end."""

from __future__ import annotations

import numpy as np
import pytest

from deployer.runtime import RuntimeConfig
from deployer.runtime.media import Image, sniff
from tests import ggufgen
from tests.images import png

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
IMAGE_TOKENS = 16  # TINY_GEMMA3_MMPROJ: 112 px in 14 px patches, 8 × 8, pooled 2 × 2


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision")
    model = ggufgen.write_gguf(folder / "tiny-gemma3.gguf", ggufgen.TINY_GEMMA3, chat_template=GEMMA_TEMPLATE)
    projector = ggufgen.write_projector(folder / "mmproj-tiny-gemma3.gguf", ggufgen.TINY_GEMMA3_MMPROJ)
    return model, projector


def _image(data: bytes) -> Image:
    fmt, width, height = sniff(data)
    return Image(fmt, data, width, height)


@pytest.mark.model
def test_libmtmd_loads_the_tiny_projector_and_encodes_an_image(vision_files):
    from deployer.runtime.llama import Model

    model_file, projector_file = vision_files
    config = RuntimeConfig(model_name="t", model_path=str(model_file), n_ctx=512, parallel=2, n_threads=2,
                           mmproj_path=str(projector_file))  # fmt: skip
    model = Model(config)
    try:
        projector = model.projector
        assert projector.vision and not projector.audio and not projector.mrope
        text_only = model.tokenize("<start_of_turn>user\nDescribe this: and that", add_special=True)
        prompt = projector.tokenize(
            ["<start_of_turn>user\nDescribe this: ", " and that"], [_image(png(40, 30))], add_bos=True
        )
        try:
            assert prompt.image_tokens == IMAGE_TOKENS
            [(start, end)] = prompt.spans
            assert end - start == IMAGE_TOKENS and set(prompt.tokens[start:end]) == {prompt.tokens[start]}
            assert prompt.tokens[start] < 0  # a placeholder, never a vocabulary id
            assert all(t >= 0 for t in prompt.tokens[:start] + prompt.tokens[end:])
            # Gemma 3's projector wraps the image in <start_of_image> ... <end_of_image> text
            assert len(prompt.tokens) > len(text_only) + IMAGE_TOKENS
            model.decode([(1, prompt.tokens[:start], 0, False)])
            projector.evaluate(model.ctx, prompt.chunk_at[start], start, 1, model.n_batch, False)
            rows = model.decode([(1, prompt.tokens[end:], end, True)])
            assert np.isfinite(model.logits(rows[0])).all()
        finally:
            prompt.free()
    finally:
        model.close()
