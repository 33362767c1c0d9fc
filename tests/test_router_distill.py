"""``router distill`` on tiny experts: the student moves towards the ensemble and loads as an
expert; bad inputs exit 2 naming what is wrong and write nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from comms.identity import Identity
from island.workloads import get_workload
from router.checkpoint import (
    build_router,
    build_workload_model,
    load_ensemble,
    load_expert,
    save_expert,
    save_router,
)
from router.cli import main
from router.distill import distillation_loss
from router.rules import parse_rule

FLOW = {"hidden": 16, "n_blocks": 1, "time_dim": 8}


def train_expert(config, k, steps=60):
    """A tiny flow expert trained briefly by flow matching on digits of one parity, so the
    ensemble's velocity field is a real one (untrained experts all output almost zero)."""
    workload = get_workload("flow", **config)
    model = workload.build_model(k)
    rows = [i for i, label in enumerate(workload.train_labels) if label % 2 == k % 2]
    batches = workload.train_batches(k, doc_indices=rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = workload.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def save_flow_ensemble(tmp, configs=(FLOW, FLOW)):
    """Experts of the given configs (seeds 0, 1, ...) and a flow router over them."""
    identity = Identity.generate()
    for k, config in enumerate(configs):
        save_expert(
            tmp / f"e{k}", train_expert(config, k), workload="flow",
            workload_config=config, expert_id=f"e{k}", cluster=k, identity=identity,
        )  # fmt: skip
    router = build_router("flow", {"hidden": 16, "depth": 1}, len(configs))
    save_router(tmp / "router", router, "flow", {"hidden": 16, "depth": 1}, len(configs),
                [f"e{k}" for k in range(len(configs))], identity=identity, workload="flow")  # fmt: skip
    return [str(tmp / f"e{k}") for k in range(len(configs))]


def write_config(tmp, experts, extra=""):
    path = tmp / "distill.toml"
    path.write_text(
        f"""
[workload]
name = "flow"
config = {json.dumps(FLOW).replace(":", " =").replace('"', "")}

[router]
dir = {json.dumps(str(tmp / "router"))}

[eval]
experts = {json.dumps(experts)}
max_batches = 1

[distill]
steps = 150
batch_size = 64
lr = 3e-3
rule = "full"
output = {json.dumps(str(tmp / "student"))}
{extra}
"""
    )
    return path


def test_distilled_student_approaches_the_ensemble_and_loads_as_an_expert(tmp_path, capsys):
    experts = save_flow_ensemble(tmp_path)
    config = write_config(tmp_path, experts)
    assert main(["distill", str(config), "--rule", "top_k:2"]) == 0
    assert "gap to the ensemble" in capsys.readouterr().out

    student, manifest = load_expert(tmp_path / "student")  # the ordinary expert loader
    assert manifest["expert_id"] == "student" and manifest["cluster"] is None
    assert manifest["train_steps"] == 150 and manifest["train_flops"] > 0
    summary = manifest["extra"]["distilled"]
    assert summary["rule"] == "top_k:2" and summary["experts"] == ["e0", "e1"]

    # measured here, with its own arithmetic, on draws neither run saw: the trained student
    # against an untrained one, by the mean squared distance of their velocities to the mixture
    ensemble = load_ensemble(experts, tmp_path / "router", rule="top_k:2").ensemble
    batches = get_workload("flow", **FLOW, batch_size=256).train_batches(99)
    untrained = build_workload_model("flow", FLOW, seed=0).eval()
    with torch.no_grad():
        batch = next(batches)
        target = ensemble.velocity(batch.x_t, batch.t)
        before = (untrained(batch.x_t, batch.t) - target).pow(2).mean().item()
        after = (student(batch.x_t, batch.t) - target).pow(2).mean().item()
    assert after < before / 5, (before, after)


def test_distillation_loss_on_hand_numbers():
    v = torch.tensor([[1.0, 2.0]])
    assert distillation_loss("flow", v, torch.tensor([[0.0, 0.0]])).item() == pytest.approx(2.5)
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    assert distillation_loss("bytelm", p, p).item() == pytest.approx(0.0, abs=1e-7)
    q_logits = torch.log(torch.tensor([[[0.25, 0.75]]]))
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert distillation_loss("bytelm", q_logits, p).item() == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("architecture", "architectures differ"),
        ("missing", "no expert checkpoint here"),
        ("student_key", "distill.student: workload flow: hiden: unknown key"),
        ("rule", "rule: unknown ensemble rule 'top3'"),
    ],
)
def test_bad_input_exits_2_naming_it_and_writes_nothing(tmp_path, capsys, case, message):
    other = {**FLOW, "hidden": 24} if case == "architecture" else FLOW
    experts = save_flow_ensemble(tmp_path, (FLOW, other))
    extra = ""
    if case == "missing":
        experts[1] = str(tmp_path / "nowhere")
    elif case == "student_key":
        extra = "student = { hiden = 8 }"
    config = write_config(tmp_path, experts, extra)
    if case == "rule":
        config.write_text(config.read_text().replace('rule = "full"', 'rule = "top3"'))
    assert main(["distill", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"router: {config}: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "student").exists()


def test_missing_checkpoint_exit_code_from_the_command_line(tmp_path):
    config = write_config(tmp_path, [str(tmp_path / "e0"), str(tmp_path / "e1")])
    run = subprocess.run(
        [sys.executable, "-m", "router", "distill", str(config), "--steps", "5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert f"{tmp_path / 'e0'}: no expert checkpoint here" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "student").exists()


def test_bytelm_student_matches_the_mixture_better_than_untrained(tmp_path):
    """bytelm: the student's KL from the ensemble's next-byte mixture, computed here, falls."""
    text = tmp_path / "corpus"
    text.mkdir()
    for n in range(6):
        (text / f"a{n}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
        (text / f"b{n}.txt").write_text("0123456789 " * 60 + f"{n}")
    model = {"data": [str(text)], "context": 16, "n_layer": 1, "n_head": 2, "d_model": 16,
             "batch_size": 8}  # fmt: skip
    identity = Identity.generate()
    for k in range(2):
        workload = get_workload("bytelm", **model)
        expert = workload.build_model(k)
        optimizer = torch.optim.AdamW(expert.parameters(), lr=1e-2)
        batches = workload.train_batches(k)
        for _ in range(20):
            loss = workload.loss(expert, next(batches))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        save_expert(tmp_path / f"e{k}", expert, workload="bytelm", workload_config=model,
                    expert_id=f"e{k}", cluster=k, identity=identity)  # fmt: skip
    router_config = {"d_model": 8, "n_layers": 1, "context": 16}
    save_router(tmp_path / "router", build_router("prefix", router_config, 2), "prefix",
                router_config, 2, ["e0", "e1"], identity=identity, workload="bytelm")  # fmt: skip
    config = tmp_path / "bytelm.toml"
    config.write_text(
        f"""
[workload]
name = "bytelm"
config = {{ data = [{json.dumps(str(text))}], context = 16, n_layer = 1, n_head = 2, d_model = 16 }}

[router]
dir = {json.dumps(str(tmp_path / "router"))}

[eval]
experts = {json.dumps([str(tmp_path / "e0"), str(tmp_path / "e1")])}
max_batches = 1

[distill]
steps = 40
batch_size = 8
lr = 1e-2
rule = "full"
output = {json.dumps(str(tmp_path / "student"))}
"""
    )
    assert main(["distill", str(config)]) == 0
    student, _ = load_expert(tmp_path / "student")
    ensemble = load_ensemble([tmp_path / "e0", tmp_path / "e1"], tmp_path / "router").ensemble
    ensemble.rule = parse_rule("full")
    windows = next(get_workload("bytelm", **model).train_batches(99)).inputs

    def kl(model):
        with torch.no_grad():
            log_p = ensemble.log_probs(windows)
            log_q = torch.log_softmax(model(windows), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()

    before, after = kl(build_workload_model("bytelm", model, seed=0)), kl(student)
    assert after < before / 3, (before, after)
