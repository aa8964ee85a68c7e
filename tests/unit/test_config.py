"""Config: every shipped option composes and lands in the typed config; bad keys and values
fail with a ConfigError that names the key."""

import dataclasses
from importlib import resources

import pytest
from omegaconf import OmegaConf

from nnxtrain.config import (
    GROUPS,
    Config,
    ModelConfig,
    RunConfig,
    compose,
    from_dict,
    validate,
)
from nnxtrain.errors import ConfigError, UserError
from nnxtrain.run.directory import make_run_dir

CONF = resources.files("nnxtrain.conf")


def find_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file in a group folder of conf/, nested ones included."""
    found = []

    def walk(folder, group: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith("_"):
                walk(entry, f"{group}/{entry.name}" if group else entry.name)
            elif group and entry.name.endswith(".yaml"):
                found.append((group, entry.name[: -len(".yaml")]))

    walk(CONF, "")
    return sorted(found)


OPTIONS = find_options()


def options(group: str) -> list[str]:
    return [o for g, o in OPTIONS if g == group]


def root_defaults() -> set[str]:
    """Groups the root config selects by default (others are added with `+group=...`)."""
    with CONF.joinpath("config.yaml").open() as f:
        root = OmegaConf.to_container(OmegaConf.create(f.read()))
    assert isinstance(root, dict)
    return {next(iter(d)) for d in root["defaults"] if isinstance(d, dict)}


# Options that by design need a value the shipped file cannot hold (files are read at
# start-up, not at composition, so a made-up path composes).
NEEDS = {
    ("data", "text"): ["data.path=corpus.txt"],
    ("data", "tokens"): ["data.path=tokens.bin"],
    ("data", "jsonl"): ["data.path=train.jsonl"],
    ("data", "preference"): ["data.path=pairs.jsonl"],
    ("experiment", "dpo"): ["data.path=pairs.jsonl"],
}


def override_for(group: str, option: str) -> str:
    add = group not in root_defaults() and not group.startswith("hydra/")
    return f"{'+' if add else ''}{group}={option}"


def test_the_shipped_groups_are_all_there():
    groups = {g for g, _ in OPTIONS}
    assert groups >= {"model", "mesh", "run", "data", "optim", "callbacks", "experiment"}
    families = {"qwen3_0.6b", "qwen2.5_0.5b", "mistral_7b", "gemma3_1b"}  # issue 26
    assert {"tiny", "small", "llama1b", *families} <= set(options("model"))
    assert {"llama1b", *families} <= set(options("experiment"))
    assert override_for("experiment", "llama1b") == "+experiment=llama1b"
    assert override_for("model", "tiny") == "model=tiny"


def yaml_values(group: str, option: str) -> dict:
    """The keys an option file sets (Hydra's `defaults` list dropped)."""
    with CONF.joinpath(*group.split("/"), f"{option}.yaml").open() as f:
        values = OmegaConf.to_container(OmegaConf.create(f.read()), resolve=False)
    assert isinstance(values, dict)
    values.pop("defaults", None)
    return values


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes(group, option):
    needs = NEEDS.get((group, option), [])
    cfg = compose([override_for(group, option), *needs])
    assert isinstance(cfg, Config)
    given = {n.split("=")[0] for n in needs}
    if group == "callbacks":
        values = yaml_values(group, option)
        assert list(cfg.callbacks) == list(values)  # same names, same order
        for name, spec in values.items():
            assert cfg.callbacks[name]["_target_"] == spec["_target_"]
    elif group in GROUPS:  # a schema'd group: every value in the file reaches the config
        composed = getattr(cfg, group)
        for key, value in yaml_values(group, option).items():
            if f"{group}.{key}" not in given:
                got = getattr(composed, key)
                if isinstance(value, dict):  # a nested section (model.moe)
                    got = {k: getattr(got, k) for k in value}
                assert got == value, f"{group}.{key}"


def test_llama1b_experiment_sets_its_choices():
    cfg = compose(["+experiment=llama1b"])
    assert cfg.model.name == "llama1b"
    assert (cfg.run.seq_len, cfg.run.batch_size) == (2048, -1)
    assert cfg.optim.lr == pytest.approx(3e-4)
    # Overrides after the experiment still win.
    assert compose(["+experiment=llama1b", "run.steps=7"]).run.steps == 7


def test_defaults_compose_to_the_dataclass_defaults_where_no_yaml_sets_them():
    cfg = compose()
    assert cfg.model.name == "small"
    assert cfg.model.scan_layers == ModelConfig().scan_layers
    assert cfg.run.grad_accum == RunConfig().grad_accum
    assert cfg.callbacks["metrics"]["log_every"] == cfg.run.log_every  # interpolation resolved


def test_overrides_are_typed():
    cfg = compose(["model=tiny", "run.steps=7", "optim.lr=1e-3", "model.tie_embeddings=true"])
    assert cfg.run.steps == 7 and isinstance(cfg.run.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.tie_embeddings is True
    with pytest.raises(Exception, match=r"run\.steps"):
        compose(["run.steps=many"])


def test_configs_are_frozen():
    cfg = compose(["model=tiny"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.steps = 3  # type: ignore[misc]


# -- unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize("override", ["run.stepz=1", "model.emb_dimm=3", "optim.lrr=0.1"])
def test_unknown_key_fails_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        compose([override])


@pytest.mark.parametrize("override", ["+run.stepz=1", "+model.emb_dimm=3"])
def test_appended_unknown_key_fails_with_config_error_naming_the_full_key(override):
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert err.value.key == key
    assert str(err.value).startswith(key)


def test_from_dict_names_unknown_keys():
    with pytest.raises(ConfigError, match="stepz"):
        from_dict(RunConfig, {"steps": 3, "stepz": 1})
    assert from_dict(RunConfig, {"steps": 3}).steps == 3


def test_unknown_group_option_fails():
    with pytest.raises(Exception, match="nope"):
        compose(["model=nope"])
    with pytest.raises(Exception, match="nope"):
        compose(["+experiment=nope"])


# -- validate() -----------------------------------------------------------------------


def with_changes(cfg: Config, **changes: dict) -> Config:
    return dataclasses.replace(
        cfg,
        **{group: dataclasses.replace(getattr(cfg, group), **kv) for group, kv in changes.items()},
    )


BAD = [
    ("run.steps", {"run": {"steps": 0}}),
    ("run.steps", {"run": {"steps": -5}}),
    ("run.batch_size", {"run": {"batch_size": 0}}),
    ("run.batch_size", {"run": {"batch_size": -2}}),
    ("run.seq_len", {"run": {"seq_len": 0}}),
    ("run.seq_len", {"run": {"seq_len": 513}}),  # > model.max_len = 512 (model=small)
    ("model.num_kv_heads", {"model": {"num_heads": 4, "num_kv_heads": 3}}),
    ("model.dtype", {"model": {"dtype": "float8"}}),
    ("model.param_dtype", {"model": {"param_dtype": "int8"}}),
    ("model.remat", {"model": {"remat": "sometimes"}}),
    ("run.grad_accum", {"run": {"batch_size": 6, "grad_accum": 4}}),
    ("optim.lr", {"optim": {"lr": 0.0}}),
    ("run.preempt_check_every", {"run": {"preempt_check_every": 0}}),
    ("mesh.heartbeat_timeout", {"mesh": {"heartbeat_timeout": 3}}),
    # Floats out of their range, or not finite: each used to be accepted silently.
    ("model.init_std", {"model": {"init_std": 0.0}}),
    ("model.init_std", {"model": {"init_std": -0.02}}),
    ("model.rope_theta", {"model": {"rope_theta": 0.0}}),
    ("model.rope_scaling", {"model": {"rope_scaling": "yarn"}}),
    ("model.rope_factor", {"model": {"rope_factor": 0.0}}),
    ("model.rope_high_freq_factor", {"model": {"rope_high_freq_factor": 1.0}}),  # = low
    ("model.rope_original_max_len", {"model": {"rope_original_max_len": 0}}),
    ("model.norm_eps", {"model": {"norm_eps": -1e-5}}),
    ("optim.b1", {"optim": {"b1": 1.0}}),
    ("optim.b1", {"optim": {"b1": -0.1}}),
    ("optim.b2", {"optim": {"b2": 1.5}}),
    ("optim.eps", {"optim": {"eps": 0.0}}),
    ("optim.weight_decay", {"optim": {"weight_decay": -0.1}}),
    ("optim.clip_norm", {"optim": {"clip_norm": -1.0}}),
    ("optim.min_lr_ratio", {"optim": {"min_lr_ratio": -0.5}}),
    ("optim.z_loss", {"optim": {"z_loss": -1e-4}}),
    ("run.goodput_every", {"run": {"goodput_every": -1.0}}),
    ("optim.lr", {"optim": {"lr": float("nan")}}),
    ("optim.b2", {"optim": {"b2": float("nan")}}),
    ("model.init_std", {"model": {"init_std": float("inf")}}),
    ("optim.warmup_steps", {"optim": {"warmup_steps": -1}}),
    ("optim.decay_steps", {"optim": {"decay_steps": -1}}),  # was reported as warmup_steps
    # Checked before the CPU device count is chosen from the axes (0 divided by zero there).
    ("mesh.data", {"mesh": {"data": 0}}),
    ("mesh.tensor", {"mesh": {"tensor": 0}}),
    ("mesh.fsdp", {"mesh": {"fsdp": -2}}),
    # It tried to join a run of 0 processes and said it waited 300 s, at once.
    ("mesh.num_processes", {"mesh": {"num_processes": 0}}),
    ("mesh.num_processes", {"mesh": {"num_processes": -2}}),
    # Seeds numpy's generators or JAX's keys refuse: they failed after compiling.
    ("run.seed", {"run": {"seed": -1}}),
    ("run.seed", {"run": {"seed": 2**70}}),
    ("data.source_seed", {"data": {"source_seed": -1}}),
    # Not HOST:PORT: said "could not join within 300 s" at once, or waited for nothing.
    ("mesh.coordinator", {"mesh": {"coordinator": "nonsense", "num_processes": 2}}),
    ("mesh.coordinator", {"mesh": {"coordinator": "127.0.0.1:99999", "num_processes": 2}}),
]


@pytest.mark.parametrize(("key", "changes"), BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_validate_names_the_bad_key(key, changes):
    cfg = with_changes(compose(), **changes)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    assert "Fix:" in str(err.value)


def test_a_bad_data_path_type_says_what_to_give():
    cfg = with_changes(compose(["data=text", "data.path=x.txt"]), data={"path": 5})
    with pytest.raises(
        ConfigError, match=r"^data\.path: must be a path .* Fix: give a file, a glob"
    ):
        validate(cfg)


def test_a_run_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("")
    cfg = compose(["model=tiny", "callbacks=none", f"run.dir={tmp_path / 'f'}"])
    with pytest.raises(UserError, match=r"^run\.dir: .* is a file, not a directory\. Fix:"):
        make_run_dir(cfg)
    assert (tmp_path / "f").read_text() == ""  # nothing written over it


def test_validate_returns_a_valid_config_unchanged():
    cfg = compose()
    assert validate(cfg) is cfg
    assert validate(with_changes(cfg, run={"seq_len": 512, "batch_size": -1})) is not None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.steps=0", "run.steps"),
        ("run.seq_len=4096", "run.seq_len"),
        ("model.num_kv_heads=3", "model.num_kv_heads"),
        ("model.dtype=float8", "model.dtype"),
        ("model.sliding_window=-1", "model.sliding_window"),
        ("model.activation=relu", "model.activation"),
        ("model.final_softcap=-1", "model.final_softcap"),
    ],
)
def test_compose_validates(override, key):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert err.value.key == key


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.steps=${nope}", "run.steps"),
        ("callbacks.checkpoint.every=${run.nope}", "callbacks.checkpoint.every"),
        ("run.dir=${oops:x}", "run.dir"),
        ("run.dir=???", "run.dir"),
    ],
)
def test_an_interpolation_that_does_not_resolve_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:  # was OmegaConf's error, a traceback in the CLI
        compose([override])
    assert err.value.key == key
