"""Every config group composes, validates and instantiates; bad values fail at launch, naming the key."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainer.config import Config, validate
from trainer.devices import get_adapter
from trainer.errors import ConfigError
from trainer.testing.configs import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(group, yaml.stem) for group in GROUPS for yaml in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_groups_cover_the_documented_set() -> None:
    assert {"device", "model", "data", "optim", "checkpoint", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_instantiates(group: str, option: str) -> None:
    # Injected faults target ranks of a worker group, so they compose with one.
    extra = ["cluster=ray_local"] if group == "faults" else []
    config = validate(compose_config([f"{group}={option}", *extra]))
    assert isinstance(config, Config)
    model = instantiate(OmegaConf.structured(config.model))
    assert isinstance(model, torch.nn.Module)
    optimizer = instantiate(OmegaConf.structured(config.optim))(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    data = instantiate(OmegaConf.structured(config.data))
    batch = data.batch([0, 1])
    assert batch.shape == (2, config.model.seq_len + 1)
    assert int(batch.max()) < config.model.vocab_size
    # The family named by the config exists (it may be unavailable on this machine, e.g. cuda).
    assert get_adapter(config.device.family).name in (config.device.family, "cpu", "npu", "cuda")


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("device.family=tpu", "device.family='tpu'", "allowed: cpu, cuda, npu, sim_cuda, sim_npu, auto"),
        ("device.precision=fp8", "device.precision='fp8'", "fp32, bf16, fp16"),
        ("checkpoint.interval_steps=-5", "checkpoint.interval_steps=-5", "an integer >= 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last=0", "an integer >= 1"),
        ("checkpoint.resume=sometimes", "checkpoint.resume='sometimes'", "latest, none"),
        ("train.steps=0", "train.steps=0", "an integer >= 1"),
        ("train.log_interval=-1", "train.log_interval=-1", "an integer >= 1"),
        ("model.n_head=3", "model.n_embd=128", "a multiple of model.n_head=3"),
        ("model.dropout=1.5", "model.dropout=1.5", "[0, 1)"),
        ("optim.lr=-0.1", "optim.lr=-0.1", "a float > 0"),
        ("data.noise=2", "data.noise=2.0", "[0, 1]"),
        ("cluster.local_worker_niceness=-5", "cluster.local_worker_niceness=-5", "an integer in 0..19"),
        ("cluster.chunk_s=-1", "cluster.chunk_s=-1.0", "a float >= 0"),
    ],
)
def test_bad_value_names_key_value_and_allowed(override: str, key: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config([override]))
    assert key in str(err.value)
    assert allowed in str(err.value)


def test_missing_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps is missing"):
        validate(compose_config(["train.steps=???"]))


def test_user_model_plugs_in_through_target() -> None:
    # A model without vocab_size/seq_len keys: the data group then needs its own values.
    overrides = ["~model", "+model._target_=torch.nn.Linear", "+model.in_features=3", "+model.out_features=2"]
    config = validate(compose_config([*overrides, "data.vocab_size=16", "data.seq_len=8"]))
    module = instantiate(config.model)
    assert isinstance(module, torch.nn.Linear)
    assert module.in_features == 3


def test_plugin_without_target_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\._target_ is missing"):
        validate(compose_config(["~model", "+model.width=3", "data.vocab_size=16", "data.seq_len=8"]))


def test_fault_rank_outside_the_group_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"faults\.kill_rank=1 is not allowed; allowed: 0\.\.0"):
        validate(compose_config(["cluster=ray_local", "faults=kill_worker", "cluster.workers=1"]))
    overrides = ["cluster=ray_local", "cluster.workers=4", "faults.kill_ranks=[1,4]", "faults.kill_at_step=3"]
    with pytest.raises(
        ConfigError, match=r"faults\.kill_ranks=\[1, 4\] names ranks \[4\].*allowed: ranks in 0\.\.3"
    ):
        validate(compose_config(overrides))
    assert validate(compose_config([*overrides[:2], "faults.kill_ranks=[1,3]", "faults.kill_at_step=3"]))


def test_every_micro_batch_of_every_rank_needs_a_sample() -> None:
    validate(compose_config(["cluster=ray_local", "cluster.workers=3", "train.global_batch_size=8"]))  # 3+3+2
    with pytest.raises(
        ConfigError, match=r"train\.global_batch_size=5 is smaller than cluster\.workers=3 x "
    ):
        validate(
            compose_config(
                [
                    "cluster=ray_local",
                    "cluster.workers=3",
                    "train.grad_accum_steps=2",
                    "train.global_batch_size=5",
                ]
            )
        )


@pytest.mark.parametrize("value", ["0", "4"])
def test_min_workers_must_lie_between_one_and_the_workers(value: str) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"cluster\.min_workers={value} .*allowed: null or an integer in 1\.\.cluster\.workers=3",
    ):
        validate(compose_config(["cluster=ray_local", "cluster.workers=3", f"cluster.min_workers={value}"]))
    assert (
        validate(
            compose_config(["cluster=ray_local", "cluster.workers=3", "cluster.min_workers=2"])
        ).cluster.least_workers
        == 2
    )
    assert validate(compose_config(["cluster=ray_local", "cluster.workers=3"])).cluster.least_workers == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+cluster.family_workers.nope=2", r"cluster\.family_workers='nope' .*allowed: families among"),
        (
            "+cluster.family_workers.sim_cuda=0",
            r"cluster\.family_workers\.sim_cuda=0 .*allowed: an integer >= 1",
        ),
        ("+cluster.family_workers.sim_npu=2", r"names the family the run starts on"),
        (
            "+cluster.family_workers.sim_cuda=9",
            r"is more than train\.global_batch_size=8; allowed: at most 8",
        ),
    ],
)
def test_family_workers_are_checked(override: str, message: str) -> None:
    base = ["cluster=ray_local", "device=sim_npu", "cluster.workers=4", "train.global_batch_size=8"]
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([*base, override]))
    cluster = validate(
        compose_config([*base, "+cluster.family_workers.sim_cuda=2", "cluster.min_workers=3"])
    ).cluster
    assert (cluster.workers_on("sim_cuda"), cluster.workers_on("sim_npu")) == (2, 4)
    assert (cluster.least_workers_on("sim_cuda"), cluster.least_workers_on("sim_npu")) == (2, 3)
