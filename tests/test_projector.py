"""Multimodal projectors in planning: the mmproj header read by ranges, its memory in the estimate."""

from __future__ import annotations

import pytest

from deployer.cache import FactsCache
from deployer.errors import OfflineCacheMiss, PlanError
from deployer.gguf_header import MIB, read_gguf
from deployer.hub import HfHubClient, Resolver
from deployer.plan import plan
from deployer.plan_report import plan_json, plan_markdown
from deployer.projector import pick_projector, projector_facts
from tests import ggufgen
from tests.plans import loaded_manifest

GIB = 1024**3
CASES = {
    "gemma3": ("google/gemma-3-27b-it-GGUF", ggufgen.GEMMA3_27B, ggufgen.GEMMA3_27B_MMPROJ),
    "qwen2.5vl": ("Qwen/Qwen2.5-VL-7B-Instruct-GGUF", ggufgen.QWEN25VL_7B, ggufgen.QWEN25VL_7B_MMPROJ),
}


@pytest.fixture(scope="session")
def mmproj_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmproj")
    written = {}

    def make(spec):
        if spec not in written:
            written[spec] = ggufgen.write_projector(folder / f"mmproj-{spec.name}-f16.gguf", spec, header_only=True)
        return written[spec]

    return make


@pytest.fixture
def resolver(fake_hub, tmp_path):
    return Resolver(HfHubClient(endpoint=fake_hub.url), FactsCache(tmp_path / "cache"))


def _repo(fake_hub, sparse_gguf, mmproj_file, case):
    repo, model, projector = CASES[case]
    model_file, proj_file = f"{model.name}-Q4_K_M.gguf", "mmproj-model-f16.gguf"
    fake_hub.add_repo(repo, {model_file: sparse_gguf(model), proj_file: mmproj_file(projector)})
    return repo, model_file, proj_file


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_projector_moves_the_estimate_by_its_size(fake_hub, sparse_gguf, mmproj_file, resolver, case):
    repo, model_file, proj_file = _repo(fake_hub, sparse_gguf, mmproj_file, case)
    spec = CASES[case][2]
    keys = {"repo": repo, "file": model_file, "quant": "Q4_K_M", "context": 8192, "gpu": "H100"}
    text_only = loaded_manifest(**keys)
    vision = loaded_manifest(**keys, mmproj=proj_file)
    without = plan(text_only, resolver.resolve_manifest(text_only))
    facts = resolver.resolve_manifest(vision)
    with_projector = plan(vision, facts)

    projector = facts.projector
    assert projector is not None
    path = mmproj_file(spec)
    raw = read_gguf(path)
    # its weights are the file's tensor data: the file less its header and the tensors' alignment padding
    padding = path.stat().st_size - raw.data_offset - projector.weight_bytes
    assert 0 <= padding < raw.alignment * len(raw.tensors)
    assert (projector.projector_type, projector.image_size, projector.patch_size) == (
        spec.kind, spec.image_size, spec.patch_size)  # fmt: skip
    assert projector.projection_dim == facts.header.embedding_length
    assert projector.has_vision and not projector.has_audio
    assert projector.sha256 == fake_hub.repos[repo].commits[facts.commit][proj_file].sha256
    # the header is read by ranges, never the tensors
    served = fake_hub.bytes_served(repo, proj_file)
    assert raw.data_offset <= served <= raw.data_offset + MIB < projector.size

    moved = with_projector.estimate.total - without.estimate.total
    assert moved == projector.weight_bytes + projector.compute_bytes == with_projector.estimate.projector
    assert with_projector.estimate.per_gpu - without.estimate.per_gpu == moved
    assert 0.5 * GIB < projector.weight_bytes < 2 * GIB  # F16 encoders of 0.4-0.7 B parameters

    [details] = plan_json([with_projector])
    assert details["projector"]["projector_type"] == spec.kind
    assert details["estimate_bytes"]["projector"] == moved
    markdown = plan_markdown([with_projector])
    assert f"**vision**: {proj_file}: {spec.kind} projector, {spec.image_size} px, " in markdown
    assert plan_json([without])[0]["projector"] is None


def test_an_audio_projector_is_planned_as_audio(fake_hub, sparse_gguf, resolver, tmp_path):
    spec = ggufgen.QWEN2_AUDIO_7B_MMPROJ
    path = ggufgen.write_audio_projector(tmp_path / "mmproj-qwen2-audio-f16.gguf", spec, header_only=True)
    repo, model_file = "example/Qwen2-Audio-7B-Instruct-GGUF", "Qwen2-Audio-7B-Instruct-Q4_K_M.gguf"
    fake_hub.add_repo(repo, {model_file: sparse_gguf(ggufgen.QWEN2_AUDIO_7B), "mmproj-f16.gguf": path})
    keys = {"repo": repo, "file": model_file, "quant": "Q4_K_M", "context": 8192, "gpu": "H100"}
    audio = loaded_manifest(**keys, mmproj="mmproj-f16.gguf")
    facts = resolver.resolve_manifest(audio)
    projector = facts.projector
    assert projector is not None and projector.has_audio and not projector.has_vision
    assert (projector.projector_type, projector.modalities, projector.image_size) == ("qwen2a", "audio", 0)
    assert (projector.embedding_length, projector.projection_dim) == (spec.n_embd, facts.header.embedding_length)
    assert projector.encoder_tokens == 1500  # 30 s of audio after the stride-2 convolution
    assert 0.5 * GIB < projector.weight_bytes < 1.5 * GIB  # Whisper-large-v3's encoder, F16
    planned = plan(audio, facts)
    assert planned.estimate.projector == projector.weight_bytes + projector.compute_bytes > projector.weight_bytes
    markdown = plan_markdown([planned])
    assert "**audio**: mmproj-f16.gguf: qwen2a projector, " in markdown and "one clip's compute" in markdown
    assert " px" not in markdown.split("**audio**")[1].split("\n")[0]


def test_gemma3_27b_projector_weighs_0_8_gib(fake_hub, sparse_gguf, mmproj_file, resolver):
    repo, model_file, proj_file = _repo(fake_hub, sparse_gguf, mmproj_file, "gemma3")
    vision = loaded_manifest(repo=repo, file=model_file, quant="Q4_K_M", context=8192, mmproj=proj_file)
    projector = resolver.resolve_manifest(vision).projector
    assert projector is not None and round(projector.weight_bytes / GIB, 1) == 0.8  # as published: 818 MiB


def test_a_projector_of_another_width_is_refused(fake_hub, sparse_gguf, mmproj_file, resolver):
    repo, model_file, _ = _repo(fake_hub, sparse_gguf, mmproj_file, "gemma3")
    fake_hub.add_repo(repo, {
        model_file: sparse_gguf(ggufgen.GEMMA3_27B),
        "mmproj-qwen.gguf": mmproj_file(ggufgen.QWEN25VL_7B_MMPROJ),
    })  # fmt: skip
    loaded = loaded_manifest(repo=repo, file=model_file, quant="Q4_K_M", context=8192, mmproj="mmproj-qwen.gguf")
    with pytest.raises(PlanError, match=r"mmproj: 'mmproj-qwen.gguf' hands the model 3584-wide embeddings, but the "
                       r"model's embedding width is 5376"):  # fmt: skip
        plan(loaded, resolver.resolve_manifest(loaded))


def test_the_model_file_named_as_projector_is_a_clear_error(fake_hub, sparse_gguf, mmproj_file, resolver):
    repo, model_file, _ = _repo(fake_hub, sparse_gguf, mmproj_file, "gemma3")
    fake_hub.add_repo(
        repo, {model_file: sparse_gguf(ggufgen.GEMMA3_27B), "mmproj-oops.gguf": sparse_gguf(ggufgen.QWEN_0_5B)}
    )
    loaded = loaded_manifest(repo=repo, file=model_file, quant="Q4_K_M", context=8192, mmproj="mmproj-oops.gguf")
    with pytest.raises(
        Exception, match=r"mmproj-oops.gguf: not a multimodal projector: general.architecture is 'qwen2'"
    ):
        resolver.resolve_manifest(loaded)


def test_offline_needs_the_projector_cached(fake_hub, sparse_gguf, mmproj_file, resolver, tmp_path):
    repo, model_file, proj_file = _repo(fake_hub, sparse_gguf, mmproj_file, "gemma3")
    loaded = loaded_manifest(repo=repo, file=model_file, quant="Q4_K_M", context=8192, mmproj=proj_file)
    online = resolver.resolve_manifest(loaded)
    offline = Resolver(None, FactsCache(tmp_path / "cache"), offline=True)
    assert offline.resolve_manifest(loaded).projector == online.projector
    empty = Resolver(None, FactsCache(tmp_path / "other"), offline=True)
    with pytest.raises(OfflineCacheMiss):
        empty.resolve_manifest(loaded)


def test_projector_facts_read_a_header_with_both_encoders(tmp_path):
    path = ggufgen.write_projector(tmp_path / "mmproj.gguf", ggufgen.GEMMA3_27B_MMPROJ, header_only=True)
    facts = projector_facts(read_gguf(path), "mmproj.gguf", path.stat().st_size)
    assert facts.modalities == "vision"
    assert facts.encoder_tokens == 64 * 64  # 896 px / 14 px patches, squared


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["model-Q4_K_M.gguf", "mmproj-model-Q8_0.gguf", "mmproj-model-f16.gguf"], "mmproj-model-f16.gguf"),
        (["m.gguf", "mmproj-BF16.gguf", "mmproj-Q8_0.gguf"], "mmproj-BF16.gguf"),
        (["m.gguf", "mmproj-Q4_K_M.gguf", "mmproj-Q8_0.gguf"], "mmproj-Q8_0.gguf"),
        (["m.gguf", "sub/mmproj-F32.gguf"], "sub/mmproj-F32.gguf"),
        (["m.gguf", "m-Q8_0.gguf"], None),
    ],
)
def test_new_offers_f16_then_q8_0_projector(files, expected):
    assert pick_projector(files) == expected


def test_the_manifest_key_is_checked():
    with pytest.raises(Exception, match="mmproj names the model file itself"):
        loaded_manifest(mmproj="model-Q8_0.gguf")
    with pytest.raises(Exception, match="mmproj"):
        loaded_manifest(mmproj="mmproj.bin")
    assert loaded_manifest(mmproj="mmproj-f16.gguf").manifest.mmproj == "mmproj-f16.gguf"


def test_the_app_downloads_the_projector_beside_the_model_and_serves_it():
    from dataclasses import replace

    from deployer.facts import ProjectorFacts
    from deployer.render import Provenance, render
    from tests.plans import make_plan

    planned = make_plan(mmproj="mmproj-f16.gguf")
    projector = ProjectorFacts(
        "mmproj-f16.gguf", 851_000_000, "ab" * 32, "gemma3", True, False, 896, 14, 1152, 64, 16, 4304
    )
    planned = replace(planned, facts=replace(planned.facts, projector=projector))
    data = render(planned, Provenance("manifests/model.toml")).data
    shards = data["model"]["shards"]
    assert shards[-1] == {"file": "mmproj-f16.gguf", "size": 851_000_000, "sha256": "ab" * 32}
    model_path = data["runtime"]["model_path"]
    assert data["runtime"]["mmproj_path"] == model_path.rsplit("/", 1)[0] + "/mmproj-f16.gguf"
    assert render(make_plan(), Provenance("manifests/model.toml")).data["runtime"]["mmproj_path"] is None
