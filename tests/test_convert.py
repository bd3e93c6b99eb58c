"""Transformers checkpoints end to end: a tiny Llama written by the tests (tests/hfgen.py) on the fake
hub is planned from its headers alone, converted by llama.cpp's own converter (from the pinned
llama-cpp-python source release) with the code the Modal app runs, checked against the
prediction, loaded by llama.cpp and asked a question through the official openai client."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from gguf.constants import GGMLQuantizationType as T

from benchmarks.estimate_vs_llama import measure
from deployer.cache import FactsCache
from deployer.conversion.converter import LLAMA_CPP_PYTHON_VERSION, Expected, check_converted, fetch_converter
from deployer.conversion.resolve import CONVERSIONS
from deployer.errors import ConversionError
from deployer.estimate import MIB, EstimateSettings, estimate
from deployer.facts import ModelFacts
from deployer.gguf_header import read_header
from deployer.hub import HfHubClient, Resolver
from deployer.plan import plan
from deployer.render import Provenance, app_data, render, write_app
from deployer.runtime import runtime_config
from tests import hfgen
from tests.plans import import_app, loaded_manifest, recorded

REPO = "org/Tiny-Llama"
MANIFEST = {"repo": REPO, "file": None, "convert_from": "safetensors", "quant": "Q8_0", "context": 1024}
HEADER_READ = 100_001  # huggingface_hub's first range read of a SafeTensors file: bytes=0-100000
# the app's functions run here as plain Python; modal says so, once per call
LOCAL_CALL = "ignore:The convert_weights function is executing locally"


@pytest.fixture(scope="session")
def tiny_safetensors(tmp_path_factory) -> dict[str, Path]:
    return hfgen.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-st"), fmt="safetensors")


@pytest.fixture(scope="session")
def converter(tmp_path_factory) -> Path:
    """llama.cpp's converter of the pinned release, fetched once per session with pip."""
    return fetch_converter(tmp_path_factory.mktemp("converter") / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}")


def _resolver(fake_hub, tmp_path: Path) -> Resolver:
    return Resolver(HfHubClient(endpoint=fake_hub.url), FactsCache(tmp_path / "cache"), conversions=CONVERSIONS)


# ## Planning: headers only


def test_plan_reads_config_and_safetensors_header_only(fake_hub, tmp_path, tiny_safetensors):
    commit = fake_hub.add_repo(REPO, {**tiny_safetensors, "README.md": b"# tiny\n"})
    loaded = loaded_manifest(**MANIFEST)
    facts = _resolver(fake_hub, tmp_path).resolve_manifest(loaded)

    weights = tiny_safetensors["model.safetensors"].stat().st_size
    served = fake_hub.bytes_served(REPO, "model.safetensors")
    assert 0 < served <= HEADER_READ < weights / 100, f"{served:,} bytes of a {weights:,}-byte file were read"
    assert fake_hub.bytes_served(REPO, "tokenizer.json") == 0, "the tokenizer's size comes from the listing"
    assert facts.commit == commit
    assert facts.file == "gguf-deploy/safetensors-Q8_0/Tiny-Llama-Q8_0.gguf"
    assert facts.conversion is not None and facts.conversion.architecture == "LlamaForCausalLM"
    assert {f.file for f in facts.conversion.files} == set(tiny_safetensors)
    header = facts.header
    assert (header.arch, header.quant, len(header.tensors), header.context_length) == ("llama", "Q8_0", 21, 2048)
    assert header.has_chat_template

    fake_hub.reset()
    again = _resolver(fake_hub, tmp_path).resolve(REPO, commit, facts.file)
    assert again.header == facts.header and again.conversion == facts.conversion
    assert fake_hub.requests == [], "a pinned commit plans again from the cache alone"

    chosen = plan(loaded, facts)
    assert chosen.gpu.type == "L4" and chosen.estimate.weights > 0


@pytest.mark.convert
def test_plan_of_pytorch_bin_uses_the_listing_sizes(fake_hub, tmp_path):
    files = hfgen.write_tiny_llama(tmp_path / "bin", fmt="pytorch")
    fake_hub.add_repo(REPO, files)
    facts = _resolver(fake_hub, tmp_path).resolve_manifest(loaded_manifest(**{**MANIFEST, "convert_from": "pytorch"}))
    assert fake_hub.bytes_served(REPO, "pytorch_model.bin") == 0, "a .bin file is never read when planning"
    assert len(facts.header.tensors) == 21 and facts.conversion is not None
    assert facts.file == "gguf-deploy/pytorch-Q8_0/Tiny-Llama-Q8_0.gguf"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        pytest.param(
            {"config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "gptq"}}).encode(), "model.safetensors": b"x"},
            "org/Tiny-Llama: its weights are gptq-quantized (GPTQ/AWQ/bitsandbytes, config.json: quantization_config); llama.cpp cannot use or convert them",
            id="gptq",
        ),
        pytest.param(
            {"config.json": json.dumps({"architectures": ["RwkvForCausalLM"]}).encode(), "model.safetensors": b"x"},
            "org/Tiny-Llama: architecture 'RwkvForCausalLM' cannot be converted by gguf-deploy",
            id="unsupported-architecture",
        ),
        pytest.param(
            {"README.md": b"# nothing here\n"},
            "org/Tiny-Llama: holds neither a GGUF file nor Transformers weights",
            id="neither-gguf-nor-weights",
        ),
    ],
)  # fmt: skip
def test_refusals_are_one_line_at_plan_time(cli, fake_hub, tmp_path, files, message):
    fake_hub.add_repo(REPO, files)
    manifest = tmp_path / "tiny.toml"
    manifest.write_text(
        f'repo = "{REPO}"\nconvert_from = "safetensors"\nquant = "Q8_0"\ncontext = 1024\n', encoding="utf-8"
    )
    result = cli("plan", str(manifest))
    assert result.code == 1
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.err
    assert message in errors[0] and str(manifest.name) in errors[0], errors[0]
    assert fake_hub.bytes_served(REPO, "model.safetensors") == 0


@pytest.mark.parametrize(
    ("quant", "tools", "fraction"),
    [("Q8_0", "with llama.cpp's converter,", 1 / 3), ("Q4_K_M", "with llama.cpp's converter and quantizer,", 1 / 5)],
)
def test_plan_cli_says_what_is_converted(cli, fake_hub, tmp_path, tiny_safetensors, quant, tools, fraction):
    fake_hub.add_repo(REPO, tiny_safetensors)
    manifest = tmp_path / "tiny.toml"
    manifest.write_text(
        f'repo = "{REPO}"\nconvert_from = "safetensors"\nquant = "{quant}"\ncontext = 1024\n', encoding="utf-8"
    )
    result = cli("plan", str(manifest), "--json")
    assert result.code == 0, result.err
    (data,) = json.loads(result.out)
    conversion = data["conversion"]
    assert conversion["source"] == "safetensors" and conversion["quant"] == quant
    assert conversion["predicted_bytes"] == data["size_bytes"] < conversion["source_bytes"] * fraction
    tables = cli("plan", str(manifest))
    assert "from safetensors weights (LlamaForCausalLM, 1 file(s)" in tables.out, tables.out
    assert tools in " ".join(tables.out.split()), tables.out


# ## The Modal app: its own function, image, resources and the Volume


def _app(tmp_path: Path, fake_hub, tiny_safetensors, quant: str = "Q8_0"):
    fake_hub.add_repo(REPO, tiny_safetensors)
    loaded = loaded_manifest(**{**MANIFEST, "quant": quant})
    chosen = plan(loaded, _resolver(fake_hub, tmp_path).resolve_manifest(loaded))
    rendered = render(chosen, Provenance("manifests/tiny.toml"))
    return chosen, rendered, import_app(write_app(rendered, tmp_path / "app"))


def test_rendered_app_has_a_conversion_function_of_its_own(fake_hub, tmp_path, tiny_safetensors):
    chosen, rendered, module = _app(tmp_path, fake_hub, tiny_safetensors)
    spec = recorded(module)
    convert, server, download = spec["convert_weights"], spec["Server.*"], spec["download_weights"]
    assert convert["gpu"] is None, "converting needs no GPU"
    assert convert["volumes"] == server["volumes"] == {"/models": {"name": "gguf-models", "create_if_missing": True}}
    assert convert["memory"] == rendered.data["resources"]["convert_memory_mib"] == 4096
    assert convert["cpu"] == module.CONVERT_CPU_CORES
    assert convert["timeout"] == rendered.data["resources"]["convert_timeout"]
    from modal._utils.async_utils import synchronizer

    images = {name: f._spec.image for name, f in module.app._local_state.functions.items()}
    own, serving = (synchronizer._translate_in(i) for i in (module.convert_image, module.image))
    assert images["convert_weights"] is own is not serving, "the conversion has an image of its own"
    assert images["Server.*"] is images["download_weights"] is serving, "the serving image stays as it is"
    assert download["volumes"] == convert["volumes"]
    assert module.LLAMA_CPP_PYTHON_VERSION == LLAMA_CPP_PYTHON_VERSION
    assert f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}" == module.LLAMA_CPP_PYTHON
    (job,) = rendered.data["convert"]
    assert job["file"] == chosen.facts.file and job["expected"] == {"arch": "llama", "tensor_count": 21, "file_type": 7}
    assert sorted(s["file"] for s in rendered.data["model"]["shards"]) == sorted(tiny_safetensors), (
        "the checkpoint is downloaded"
    )
    assert rendered.data["runtime"]["model_path"].endswith(f"/{chosen.facts.commit}/{chosen.facts.file}")


def test_a_gguf_app_converts_nothing(tmp_path):
    from tests.plans import make_plan

    data = app_data(make_plan())
    assert data["convert"] == []
    assert data["resources"]["convert_memory_mib"] == 4096


# ## Converting for real, with the app's own code


def _convert_with_the_app(
    tmp_path_factory, converter: Path, tiny: dict[str, Path], quant: str
) -> Iterator[SimpleNamespace]:
    """The app's download and conversion steps run here (Modal absent: the Volume is a folder)."""
    import huggingface_hub.constants as constants

    import tests.fakehub as fakehub_module

    hub = fakehub_module.FakeHub()
    mp = pytest.MonkeyPatch()
    try:
        home = tmp_path_factory.mktemp("hub-home")
        mp.setattr(constants, "ENDPOINT", hub.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.delenv("HF_TOKEN", raising=False)
        tmp = tmp_path_factory.mktemp("convert-app")
        chosen, rendered, module = _app(tmp, hub, tiny, quant=quant)
        module.MODELS_DIR = tmp / "volume"
        module.CONVERTER_DIR = str(converter)
        module.volume = SimpleNamespace(reload=lambda: None, commit=lambda: None)
        for shard in rendered.data["model"]["shards"]:
            module.fetch_shard(shard)
        module.convert_weights.local()
        out = module.shard_path(rendered.data["convert"][0]["file"])
        yield SimpleNamespace(plan=chosen, module=module, path=out, data=rendered.data)
    finally:
        mp.undo()
        hub.close()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, converter, tiny_safetensors):
    """Q8_0: written by llama.cpp's converter itself."""
    yield from _convert_with_the_app(tmp_path_factory, converter, tiny_safetensors, "Q8_0")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, converter, tiny_safetensors):
    """Q4_K_M: the converter's 16-bit output quantized by llama.cpp's quantizer."""
    yield from _convert_with_the_app(tmp_path_factory, converter, tiny_safetensors, "Q4_K_M")


def assert_is_the_prediction(path: Path, predicted: ModelFacts, quant: str) -> None:
    """The file's tensors, types and sizes are the predicted ones; its size within 1 %; no partial file left."""
    actual = read_header(path)
    assert {t.name: (t.shape, T(t.ggml_type).name, t.n_bytes) for t in actual.tensors} == {
        t.name: (t.shape, T(t.ggml_type).name, t.n_bytes) for t in predicted.header.tensors
    }, "the conversion wrote other tensors or types than predicted"
    size = path.stat().st_size
    assert abs(predicted.size_bytes - size) <= 0.01 * size, f"predicted {predicted.size_bytes:,}, wrote {size:,}"
    assert (actual.arch, actual.quant, actual.context_length) == ("llama", quant, 2048)
    assert actual.has_chat_template
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no partial or intermediate file left"


@pytest.mark.model
@pytest.mark.convert
@pytest.mark.filterwarnings(LOCAL_CALL)
def test_converted_file_is_the_predicted_one(converted):
    assert_is_the_prediction(converted.path, converted.plan.facts, "Q8_0")


@pytest.mark.model
@pytest.mark.convert
@pytest.mark.filterwarnings(LOCAL_CALL)
def test_quantized_file_is_the_predicted_mix_and_answers_through_openai(quantized, start_server):
    assert_is_the_prediction(quantized.path, quantized.plan.facts, "Q4_K_M")
    types = {t.name: T(t.ggml_type) for t in read_header(quantized.path).tensors}
    assert {types["blk.1.attn_v.weight"], types["output.weight"], types["blk.0.attn_v.weight"]} == {T.Q6_K, T.Q4_K}
    assert quantized.data["convert"][0]["expected"]["file_type"] == 15
    assert quantized.data["resources"]["convert_memory_mib"] == 4096

    server = start_server(runtime_config(quantized.plan.manifest, str(quantized.path), require_api_key=False))
    reply = server.client().chat.completions.create(
        model=quantized.plan.manifest.name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1


@pytest.mark.model
@pytest.mark.convert
def test_a_failing_quantizer_is_one_error_and_leaves_nothing(tmp_path):
    from deployer.conversion.converter import quantize

    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ConversionError, match=r"^llama.cpp's quantizer failed \(exit status 1\):\n") as caught:
        quantize(not_gguf, tmp_path / "out.gguf", "Q4_0")
    assert "failed to quantize" in str(caught.value), "llama.cpp's own reason is shown"
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(ConversionError, match=r"used for Q4_0, .*, not Q8_0"):
        quantize(not_gguf, tmp_path / "out.gguf", "Q8_0")


@pytest.mark.model
@pytest.mark.convert
@pytest.mark.filterwarnings(LOCAL_CALL)
def test_second_conversion_converts_nothing(converted, capsys):
    before = converted.path.stat().st_mtime_ns
    converted.module.convert_weights.local()
    assert converted.path.stat().st_mtime_ns == before
    assert "cached: " in capsys.readouterr().out


@pytest.mark.model
@pytest.mark.convert
def test_a_file_unlike_the_plan_is_refused(converted):
    with pytest.raises(ConversionError, match=r"the plan expects llama, 22 tensors, file type 7"):
        check_converted(converted.path, Expected("llama", 22, 7))


@pytest.mark.model
@pytest.mark.convert
def test_memory_estimate_of_the_prediction_holds_for_llama_cpp(converted):
    settings = EstimateSettings(1024, backend="cpu")
    actual = measure(converted.path, settings)
    e = estimate(converted.plan.facts.header, settings)
    for mine, theirs in ((e.weights, actual.weights), (e.kv, actual.kv), (e.output, actual.output)):
        assert abs(mine - theirs) <= 0.01 * MIB
    error = e.weights + e.kv + e.compute + e.output - actual.total
    assert -max(0.01 * actual.total, 8 * MIB) <= error <= max(0.03 * actual.total, 16 * MIB)
    assert e.compute >= actual.compute


# ## Locally: `gguf-deploy serve` converts into the cache, with the same code


@pytest.mark.model
@pytest.mark.convert
def test_serve_converts_into_the_local_cache_once_and_answers_through_openai(
    fake_hub, tiny_safetensors, converter, monkeypatch, start_server, tmp_path
):
    from deployer.cache import default_cache_dir
    from deployer.conversion.converter import default_converter_dir
    from deployer.local_model import find_model_file

    fake_hub.add_repo(REPO, tiny_safetensors)
    cache = default_cache_dir()
    shutil.copytree(converter, default_converter_dir(cache))  # fetched once per session already
    # Q4_0, a legacy type: the converter's 16-bit output quantized by llama.cpp's quantizer
    loaded = loaded_manifest(**{**MANIFEST, "quant": "Q4_0"})
    found = find_model_file(loaded.manifest)
    assert found.path.is_relative_to(cache / "converted" / REPO)
    predicted = _resolver(fake_hub, tmp_path).resolve_manifest(loaded)
    assert_is_the_prediction(found.path, predicted, "Q4_0")
    assert "converted to Q4_0" in found.source

    server = start_server(runtime_config(loaded, str(found.path), require_api_key=False))
    reply = server.client().chat.completions.create(
        model=loaded.name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1

    def no_converter() -> list[str]:
        raise AssertionError("a cached conversion needs neither the converter nor its packages")

    monkeypatch.setattr("deployer.conversion.converter.missing_packages", no_converter)
    assert find_model_file(loaded.manifest, offline=True).path == found.path


def test_serve_says_which_extra_to_install(fake_hub, tmp_path, tiny_safetensors, monkeypatch):
    from deployer.local_model import find_model_file

    fake_hub.add_repo(REPO, tiny_safetensors)
    monkeypatch.setattr("deployer.conversion.converter.missing_packages", lambda: ["torch", "transformers"])
    with pytest.raises(ConversionError, match=r"needs torch, transformers: pip install 'gguf-deploy\[convert\]'"):
        find_model_file(loaded_manifest(**MANIFEST).manifest)


def test_the_benchmark_parser_counts_the_amx_buffer_as_a_cpu_only_repack():
    from benchmarks.estimate_vs_llama import parse_buffers

    log = (
        "load_tensors:          AMX model buffer size =     5.34 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =     5.06 MiB\n"
        "llama_context:        CPU  output buffer size =     0.01 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =     2.00 MiB\n"
        "sched_reserve:        CPU compute buffer size =    12.00 MiB\n"
    )
    buffers = parse_buffers(log)
    assert (buffers.weights, buffers.repack) == (round(5.06 * MIB), round(5.34 * MIB))


@pytest.mark.model
def test_the_quantizers_file_types_are_llama_cpps():
    import llama_cpp

    from deployer.quants import FILE_TYPES, QUANTIZER_QUANTS

    assert {q: FILE_TYPES[q] for q in QUANTIZER_QUANTS} == {
        q: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}") for q in QUANTIZER_QUANTS
    }


@pytest.mark.model
def test_the_converter_pin_is_the_engine_the_tests_run():
    from importlib.metadata import version

    assert version("llama_cpp_python") == LLAMA_CPP_PYTHON_VERSION


@pytest.mark.convert
def test_every_planned_architecture_is_registered_in_the_converter(converter):
    import ast

    from deployer.conversion.checkpoint import LAYOUTS

    registered: set[str] = set()
    for source in (converter / "conversion").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "register":
                registered |= {arg.value for arg in node.args if isinstance(arg, ast.Constant)}
    assert len(registered) > 100, "the converter's registry was not found"
    assert set(LAYOUTS) <= registered
    assert (converter / "convert_hf_to_gguf.py").is_file() and (converter / "gguf-py" / "gguf").is_dir()


def test_new_offers_a_conversion_when_the_repo_has_no_gguf(cli, fake_hub, tmp_path, tiny_safetensors):
    fake_hub.add_repo(REPO, tiny_safetensors)
    result = cli("new", REPO, cwd=tmp_path)
    assert result.code == 0, result.err
    assert "wrote manifests/tiny-llama-q8-0.toml: safetensors weights, converted to Q8_0, context 2048" in result.out
    text = (tmp_path / "manifests" / "tiny-llama-q8-0.toml").read_text(encoding="utf-8")
    assert text.splitlines()[1:] == [
        'name = "tiny-llama-q8-0"',
        f'repo = "{REPO}"',
        'convert_from = "safetensors"',
        'quant = "Q8_0"',
        "context = 2048",
    ]
    assert "convert  " in result.out and "from safetensors weights" in result.out, "the plan follows"
    assert cli("validate", "manifests", cwd=tmp_path).code == 0


def test_a_gguf_manifest_for_a_weights_repo_is_pointed_to_convert_from(fake_hub, tmp_path, tiny_safetensors):
    from deployer.errors import HubError

    fake_hub.add_repo(REPO, tiny_safetensors)
    with pytest.raises(HubError, match=r"holds Transformers weights: set convert_from instead of file"):
        _resolver(fake_hub, tmp_path).resolve_manifest(loaded_manifest(repo=REPO, file="Tiny-Llama-Q8_0.gguf"))


# ## The predicted mixes against llama.cpp's quantizer itself, at real widths (a dry run: no weights)

SHAPES = {
    "llama3-8b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "vocab_size": 128256, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    "llama-70b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
                  "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
    "qwen2-0.5b-tied": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
                        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                        "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen3-gqa2": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "vocab_size": 151936, "tie_word_embeddings": True},
}  # fmt: skip


@pytest.mark.model
@pytest.mark.parametrize("shape", list(SHAPES))
def test_predicted_mixes_are_llama_cpps_at_real_widths(shape, tmp_path):
    from deployer.conversion.checkpoint import layout_of, predict, tensors_from_config
    from deployer.quants import NOT_CONVERTED, QUANTIZER_QUANTS
    from tests.quantizer import dry_run, sparse_gguf

    config = {"max_position_embeddings": 8192, "torch_dtype": "float16", **SHAPES[shape]}
    tensors = tensors_from_config(config, layout_of(config, "org/m"))
    source = sparse_gguf(tmp_path / "f16.gguf", predict(config, tensors, "F16").header)
    imatrix_types = [q for q, why in NOT_CONVERTED.items() if "importance matrix" in why]
    runs = dry_run(source, [*QUANTIZER_QUANTS, *imatrix_types])
    for quant in QUANTIZER_QUANTS:
        predicted = {t.name: T(t.ggml_type) for t in predict(config, tensors, quant).header.tensors}
        wrong = {
            name: (mine, runs[quant].types.get(name))
            for name, mine in predicted.items()
            if runs[quant].types.get(name) != mine
        }
        assert not wrong and len(runs[quant].types) == len(predicted), f"{quant}: (predicted, llama.cpp) {wrong}"
        assert not runs[quant].needs_imatrix, f"{quant} needs an importance matrix"
    if config["hidden_size"] % 256 == 0:  # else the IQ types fall back to IQ4_NL, which needs none
        assert [q for q in imatrix_types if not runs[q].needs_imatrix] == [], "refused, yet llama.cpp needs no imatrix"
