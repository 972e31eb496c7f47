"""LoRA in the job server (issue 27): a request names adapters from the server's
--lora-dir (never a path); an unknown name, a path, a bad weight or a name given twice is
a 400 naming the rule; a job stores the resolved file and hash, and its worker switches
the pipeline to exactly those adapters (none: the base model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.lora import Adapter, save_kohya
from easyanimate_rt.runtime.serve.app import create_app
from easyanimate_rt.runtime.serve.jobs import Limits, LoraLibrary, run_job
from easyanimate_rt.runtime.serve.store import JobStore

CONFIG = from_preset("tiny")
BODY = {"prompt": "a red circle", "height": 64, "width": 64, "frames": 9, "steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    for name in ("style", "motion"):
        save_kohya(d / f"{name}.safetensors", {"dit.transformer_blocks.0.attn1.to_q":
                                               (torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g))},
                   alpha=2.0, rank=2)
    (d / "notes.txt").write_text("not a LoRA")
    return d


@pytest.fixture
def client(tmp_path, lora_dir):
    store = JobStore(tmp_path / "store")
    app = create_app(store, CONFIG, Limits(), loras=LoraLibrary.scan(lora_dir))
    with TestClient(app) as c:
        yield c, store


def test_the_library_offers_the_dirs_safetensors_by_name(lora_dir):
    lib = LoraLibrary.scan(lora_dir)
    assert sorted(lib.adapters) == ["motion", "style"]
    resolved = lib.resolve(["style:0.5", "motion"])
    assert [(e["name"], e["weight"]) for e in resolved] == [("style", 0.5), ("motion", 1.0)]
    assert resolved[0]["sha256"] == Adapter.open(lora_dir / "style.safetensors").sha256
    with pytest.raises(InputError, match="--lora-dir must be a directory"):
        LoraLibrary.scan(lora_dir / "notes.txt")


def test_a_job_names_adapters_and_stores_their_files(client, lora_dir):
    c, store = client
    r = c.post("/v1/videos", json={**BODY, "lora": ["style:0.5"]})
    assert r.status_code == 202, r.text
    job = store.get(r.json()["id"])
    (entry,) = job.request["lora"]
    assert entry == {"name": "style", "weight": 0.5, "path": str(lora_dir / "style.safetensors"),
                     "sha256": Adapter.open(lora_dir / "style.safetensors").sha256}
    r = c.post("/v1/videos", json=BODY)
    assert r.status_code == 202 and "lora" not in store.get(r.json()["id"]).request


@pytest.mark.parametrize("lora, rule", [
    (["cartoon"], "lora: unknown adapter 'cartoon'; this server offers: motion, style"),
    (["../loras/style"], "lora: unknown adapter '../loras/style'"),
    (["/etc/passwd"], "lora: unknown adapter '/etc/passwd'"),
    (["style:strong"], "lora: the weight of 'style' must be a number"),
    (["style:nan"], "lora: the weight of 'style' must be finite"),
    (["style", "style:0.5"], "lora: 'style' is named twice"),
    (["style", "motion", "style:1", "motion:2", "x"], "lora: at most 4 adapters per request, got 5"),
    ("style", "lora: Input should be a valid list"),
])
def test_bad_lora_fields_are_400_naming_the_rule(client, lora, rule):
    c, store = client
    r = c.post("/v1/videos", json={**BODY, "lora": lora})
    assert r.status_code == 400 and rule in r.json()["error"]["message"], r.text


def test_a_server_without_a_lora_dir_refuses_any_name(tmp_path):
    app = create_app(JobStore(tmp_path / "s"), CONFIG, Limits())
    with TestClient(app) as c:
        r = c.post("/v1/videos", json={**BODY, "lora": ["style"]})
    assert r.status_code == 400 and "this server offers: none (the server has no --lora-dir)" in r.text


class RecordingPipe:
    """run_job's view of a Pipeline: the adapters it is switched to, then a refusal to
    generate (what we check happens before any work)."""

    config = CONFIG

    def __init__(self):
        self.switched: list = []

    def set_loras(self, adapters):
        self.switched.append(list(adapters))

    def generate_to(self, *args, **kwargs):
        raise InputError("stop here")


def test_the_worker_switches_to_the_jobs_adapters(lora_dir, tmp_path):
    lib, pipe = LoraLibrary.scan(lora_dir), RecordingPipe()
    request = {**BODY, "lora": lib.resolve(["motion:0.25"])}
    for req in (request, BODY):
        with pytest.raises(InputError, match="stop here"):
            run_job(pipe, req, tmp_path / "v.mp4", lambda done, total: False, None, 0)
    assert pipe.switched == [[Adapter.open(lora_dir / "motion.safetensors", 0.25)], []]
