"""Data-parallel training: two real CPU processes under torchrun with gloo end with identical replicas."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backend.methods.supervised import Supervised
from backend.engine.checkpoints import load_checkpoint, seed_everything
from backend.engine.training import train
from backend.engine.distributed import train_distributed
from helpers.engine_projects import small_brain_project

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_weights(tmp_path):
    project = small_brain_project(tmp_path / "small")
    dump = tmp_path / "weights"
    events = []
    run = train_distributed(project, "supervised", nproc=2, preset="tiny", steps=3, device="cpu",
                            overrides={"val_every": 1000, "checkpoint_every": 1000}, on_event=events.append,
                            worker_args=["--dump-weights", str(dump)])
    assert events[0]["type"] == "start" and events[0]["world_size"] == 2 and events[-1]["type"] == "done"
    rank0 = torch.load(dump / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and len(rank0) > 50
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    # a single process with rank 0's seed sees rank 0's batches only: its weights differ, so rank 1 drew other
    # patches and the replicas are equal because their gradients were averaged, not because their inputs were
    single = train(project, "supervised", preset="tiny", steps=3, device="cpu",
                   overrides={"val_every": 1000, "checkpoint_every": 1000})
    alone = load_checkpoint(project.model_dir("supervised", single) / "checkpoint.pt")["method"]["modules"]["net"]
    assert any(not torch.equal(alone[k.split(".", 1)[1]], rank0[k]) for k in rank0)
    seed_everything(0)
    initial = Supervised(Supervised.make_config("tiny", num_classes=3)).net.state_dict()
    assert any(not torch.equal(initial[k.split(".", 1)[1]], rank0[k]) for k in rank0)  # and training moved them
    # only rank 0 wrote: one run folder, one checkpoint equal to the replicas
    runs = sorted(p.name for p in (project.semiseg / "models" / "supervised").iterdir())
    assert runs == sorted([run, single])
    info = json.loads((project.model_dir("supervised", run) / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "done" and info["steps_done"] == 3
    saved = load_checkpoint(project.model_dir("supervised", run) / "checkpoint.pt")["method"]["modules"]["net"]
    for key, tensor in rank0.items():
        assert torch.equal(saved[key.split(".", 1)[1]], tensor)

    # cancel (SIGTERM through torchrun to both workers) and resume the same run on two processes
    seen = []
    stop = lambda: any(e["type"] == "progress" for e in seen)  # noqa: E731
    assert train_distributed(project, "supervised", nproc=2, run=run, resume=True, steps=400, device="cpu",
                             on_event=seen.append, should_stop=stop) == run
    assert seen[0]["resumed"] and seen[0]["step"] == 3 and seen[-1]["type"] == "cancelled"
    stopped_at = seen[-1]["step"]
    assert 3 < stopped_at < 400
    info = json.loads((project.model_dir("supervised", run) / "run.json").read_text())
    assert info["status"] == "cancelled" and info["steps_done"] == stopped_at
    assert load_checkpoint(project.model_dir("supervised", run) / "checkpoint.pt")["step"] == stopped_at


def test_worker_options_pass_through_torchrun_untouched():
    """torchrun's own parser sees the worker's options too (it accepts abbreviations): none may clash."""
    from torch.distributed.run import get_args_parser

    from backend.engine.distributed import _command

    cmd = _command(REPO, "supervised", 2, preset="tiny", steps=5, device="cpu", run="r1", resume=True,
                   overrides={"lr": 0.1}, worker_args=["--dump-weights", "/tmp/w"])
    parsed = get_args_parser().parse_args(cmd[cmd.index("torch.distributed.run") + 1:])
    assert parsed.nproc_per_node == "2" and parsed.module and parsed.training_script == "backend.engine.distributed"
    assert parsed.training_script_args == cmd[cmd.index("backend.engine.distributed") + 1:]
    assert "--run-name" in parsed.training_script_args
