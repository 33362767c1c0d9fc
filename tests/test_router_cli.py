"""The ``router`` command line on a tiny text corpus: partition, train, eval; a bad config
prints ``router: <file>: <key>: <message>`` and exits 2 without a traceback."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import pytest

from comms.identity import Identity
from router import Client
from router.checkpoint import build_workload_model, partition_id, save_expert, save_router
from router.cli import main
from router.models import PrefixRouter

TOPICS = {
    "loop": "import asyncio\nasync def task(loop):\n    await asyncio.sleep(0)  # event loop future {i}\n",
    "xml": "from xml.etree import ElementTree\nnode = tree.find('element{i}')  # parse attribute\n",
}
MODEL = {"context": 32, "n_layer": 1, "n_head": 2, "d_model": 32, "batch_size": 4}


def write_corpus(folder):
    folder.mkdir()
    for topic, line in TOPICS.items():
        for n in range(4):
            text = "".join(line.format(i=i + 10 * n) for i in range(6))
            (folder / f"{topic}{n}.py").write_text(text)
    return folder


def toml_value(value):
    return json.dumps(value)  # JSON strings, numbers and lists are valid TOML


def write_config(path, corpus, tmp, extra=""):
    model = ", ".join(f"{k} = {toml_value(v)}" for k, v in MODEL.items())
    path.write_text(
        f"""
[workload]
name = "bytelm"
config = {{ data = [{toml_value(str(corpus))}], {model} }}

[partition]
dir = {toml_value(str(tmp / "part"))}
k = 2
svd_dims = 4
n_init = 2

[router]
dir = {toml_value(str(tmp / "router"))}
config = {{ d_model = 16, n_layers = 1, context = 32 }}
steps = 3
batch_size = 8
eval_samples = 16

[eval]
experts = [{toml_value(str(tmp / "e0"))}, {toml_value(str(tmp / "e1"))}]
rules = ["full", "top1"]
max_batches = 1
output = {toml_value(str(tmp / "eval.json"))}
{extra}
"""
    )
    return path


def test_partition_train_and_eval(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    config = write_config(tmp_path / "run.toml", corpus, tmp_path)

    assert main(["partition", str(config)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "part" / "partition.json").is_file()
    assert "cluster 0:" in out and "cluster 1:" in out
    assert "saved partition" in out

    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "router" / "manifest.json").read_text())
    assert manifest["router_kind"] == "prefix" and manifest["num_experts"] == 2
    assert manifest["partition_id"] == partition_id(tmp_path / "part")
    assert "held-out accuracy" in out

    identity = Identity.generate()
    for k in range(2):
        save_expert(
            tmp_path / f"e{k}", build_workload_model("bytelm", MODEL, seed=k),
            workload="bytelm", workload_config=MODEL, expert_id=f"e{k}", cluster=k,
            identity=identity, partition=manifest["partition_id"],
        )  # fmt: skip
    assert main(["eval", str(config)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval.json").read_text())
    names = {"expert e0", "expert e1", "ensemble full", "ensemble top1"}
    assert set(report["losses"]) == names
    # untrained experts sit near the uniform byte loss, ln 256
    assert all(abs(v - math.log(256)) < 0.5 for v in report["losses"].values())
    assert "ensemble full" in out


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("kk = 3", "kk"),  # lands in [eval]: an unknown key there
        ("[serve]\nport = 1", "serve"),
    ],
)
def test_unknown_config_key_exits_2_naming_it(tmp_path, capsys, extra, key):
    corpus = write_corpus(tmp_path / "corpus")
    config = write_config(tmp_path / "bad.toml", corpus, tmp_path, extra)
    assert main(["partition", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"router: {config}: ")
    assert key in err and "unknown key" in err
    assert "Traceback" not in err


def test_bad_workload_settings_exit_2_naming_the_key(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    config = write_config(tmp_path / "run.toml", corpus, tmp_path)
    text = config.read_text()
    config.write_text(text.replace("n_layer = 1", "n_layerz = 1"))
    assert main(["partition", str(config)]) == 2
    assert "workload.config: n_layerz: unknown key" in capsys.readouterr().err
    config.write_text(text.replace(str(corpus), str(tmp_path / "nowhere")))
    assert main(["partition", str(config)]) == 2
    assert "workload.config.data:" in capsys.readouterr().err
    config.write_text(text.replace("k = 2", "k = 0"))
    assert main(["partition", str(config)]) == 2
    assert f"{config}: partition: k: must be at least 1" in capsys.readouterr().err


def test_train_without_a_partition_and_bad_serve_config(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    config = write_config(tmp_path / "run.toml", corpus, tmp_path)
    assert main(["train", str(config)]) == 2
    assert "partition.dir" in capsys.readouterr().err
    serve = tmp_path / "serve.toml"
    serve.write_text('listen = "127.0.0.1:0"\nexperts = []\nrouter = "r"\n')
    assert main(["serve", str(serve)]) == 2
    err = capsys.readouterr().err
    assert f"router: {serve}: experts:" in err and "Traceback" not in err


def test_serve_runs_until_sigterm(tmp_path):
    identity = Identity.generate()
    experts = []
    for k in range(2):
        directory = tmp_path / f"e{k}"
        save_expert(
            directory, build_workload_model("bytelm", MODEL, seed=k), workload="bytelm",
            workload_config=MODEL, expert_id=f"e{k}", cluster=k, identity=identity,
        )  # fmt: skip
        experts.append(str(directory))
    save_router(
        tmp_path / "router", PrefixRouter(2, d_model=16, n_layers=1, context=32), "prefix",
        {"d_model": 16, "n_layers": 1, "context": 32}, 2, identity=identity, workload="bytelm",
    )  # fmt: skip
    serve = tmp_path / "serve.toml"
    serve.write_text(
        f'listen = "127.0.0.1:0"\nexperts = {toml_value(experts)}\n'
        f"router = {toml_value(str(tmp_path / 'router'))}\n"
        "[limits]\nmax_new_bytes = 16\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "serve", str(serve)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "router serving bytelm ensemble" in line, proc.stderr.read()
        url = line.rsplit(" ", 1)[1].strip()
        client = Client(url, timeout=30)
        assert client.generate("hi", max_bytes=16, seed=0).bytes_generated == 16
        assert client.experts()["limits"]["max_new_bytes"] == 16
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
