"""The pretrain job's config: model, parallel layout, optimizer, data and run settings.

`pretrain_config` turns the Hydra config into typed dataclasses and checks everything that
can be checked without processes or devices, so mistakes surface before a cluster is booked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from neoray.checkpoint.config import CheckpointConfig
from neoray.checkpoint.init_from import check_source, open_source
from neoray.checkpoint.manifest import SAFE_NAME
from neoray.config import ConfigError, dataclass_from_config, to_dict
from neoray.data.config import DataConfig, data_config
from neoray.data.gpt_dataset import split_documents
from neoray.data.indexed import (
    IndexedDataset,
    IndexedFormatError,
    bin_path,
    token_files_exist,
)
from neoray.energy.grid import EnergyConfig
from neoray.model.gpt_neox import NeoXConfig
from neoray.parallel.config import ParallelConfig, validate_layout
from neoray.storage import StorageConfig
from neoray.tokenizer.load import load_tokenizer
from neoray.training.spike import SpikeConfig, checked_ranges

if TYPE_CHECKING:
    from omegaconf import DictConfig

PRECISIONS = ("fp32", "bf16", "fp16")
RUN_NAME = SAFE_NAME  # one folder name in any store


@dataclass
class OptimConfig:
    """AdamW with warmup and cosine decay; defaults are GPT-NeoX-20B's (configs/20B.yml)."""

    lr: float = 0.97e-4
    min_lr: float = 0.97e-5  # the floor of the cosine decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases and layernorm weights
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    warmup: float = 0.01  # fraction of the decay steps spent warming up linearly
    decay_steps: int | None = None  # None: decay over all of train.steps

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be within [0, optim.lr={self.lr}]")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"optim.warmup={self.warmup} is a fraction of steps: use [0, 1)")
        if self.grad_clip < 0:
            raise ConfigError("optim.grad_clip must be >= 0 (0 turns clipping off)")


@dataclass
class TrainConfig:
    """The run itself: length, precision, where outputs go, how failures are handled."""

    steps: int = 100
    seed: int = 1234
    precision: str = "fp32"
    initial_loss_scale_power: int = 12  # fp16 dynamic loss scaling starts at 2**this
    max_nonfinite_steps: int = 3  # stop after this many consecutive non-finite losses
    peak_tflops: float | None = None  # device peak for MFU; None: known GPU or a CPU probe
    # weights to start from (HF GPTNeoX dir, local or s3://; run:<name>[@<step>]; a checkpoint's
    # <root>/<run>/checkpoints/step_<n>; a torch.save state dict): see neoray.checkpoint.init_from
    init_from: str | None = None
    save_final: bool = False  # write each rank's final weights to <run_dir>/final/
    compile: bool = False  # torch.compile each transformer layer (fused elementwise kernels)
    log_interval: int = 10  # rank 0 prints a progress line every this many steps; 0: never
    eval_interval: int = 1000  # validate every this many steps and at the end; 0: never
    eval_iters: int = 10  # global batches of the validation split per validation
    skip_steps: list = field(default_factory=list)  # [[first, last], ...]: batches not trained
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # loss spikes: see training.spike

    def __post_init__(self) -> None:
        if not isinstance(self.spike, SpikeConfig):
            self.spike = dataclass_from_config(SpikeConfig, self.spike, "train.spike")
        checked_ranges(self.skip_steps, "train.skip_steps")
        self.skip_steps = [list(entry) for entry in self.skip_steps]
        if self.steps < 1:
            raise ConfigError(f"train.steps must be at least 1, got {self.steps}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        if self.log_interval < 0:
            raise ConfigError("train.log_interval must be >= 0 (0 turns progress lines off)")
        if self.max_nonfinite_steps < 1:
            raise ConfigError("train.max_nonfinite_steps must be at least 1")
        if self.eval_interval < 0:
            raise ConfigError("train.eval_interval must be >= 0 (0 turns validation off)")
        if self.eval_interval and self.eval_iters < 1:
            raise ConfigError(
                f"train.eval_iters={self.eval_iters}: validation needs at least 1 batch "
                "(or set train.eval_interval=0 to turn it off)"
            )

    def validates_after(self, done: int) -> bool:
        """Whether validation runs once `done` steps are trained: every `eval_interval`
        steps, and after the last one."""
        return bool(self.eval_interval) and (done % self.eval_interval == 0 or done == self.steps)


@dataclass
class SyntheticDataConfig:
    """Random tokens, a pure function of (seed, sample index): for tests and benchmarks."""

    seq_len: int = 128
    seed: int = 1234
    synthetic: bool = True


@dataclass
class PretrainConfig:
    model: NeoXConfig
    parallel: ParallelConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig | SyntheticDataConfig
    run_dir: str
    run_name: str = "pretrain"  # names the run's checkpoints; rerunning it resumes them
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)

    def __post_init__(self) -> None:
        if not RUN_NAME.fullmatch(self.run_name):
            raise ConfigError(
                f"run_name={self.run_name!r}: use letters, digits, '.', '_' and '-' "
                "(it becomes a folder name in the checkpoint storage)"
            )
        if self.train.spike.enabled and not self.checkpoint.enabled:
            raise ConfigError(
                "train.spike.enabled=true rolls back to the last committed checkpoint: set "
                "checkpoint.enabled=true"
            )

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.parallel.sequences_per_step * self.seq_len


def tokenizer_vocab_size(data: DataConfig) -> int | None:
    """Token ids the data's tokenizer produces; before preprocessing has trained it, the size
    it will be trained to (`data.tokenizer_training.vocab_size`); None when neither is known."""
    try:
        return load_tokenizer(data.tokenizer).vocab_size
    except FileNotFoundError:
        return (data.tokenizer_training or {}).get("vocab_size")


def validate_vocab(model: NeoXConfig, data: DataConfig) -> None:
    """Every token id of the data must have an embedding row: an id past the vocabulary would
    only fail deep inside the first forward pass, on each rank, as an index error."""
    tokens = tokenizer_vocab_size(data)
    if tokens is not None and tokens > model.vocab_size:
        raise ConfigError(
            f"data.tokenizer={data.tokenizer!r} has {tokens:,} token ids but "
            f"model.vocab_size={model.vocab_size:,}: set model.vocab_size={tokens}"
        )


def checked_token_files(model: NeoXConfig, data: DataConfig) -> dict[str, IndexedDataset]:
    """The components whose token files exist already, opened: each a complete, undamaged pair
    (see `IndexedDataset`) whose token ids, as far as a sample of them shows, all have an
    embedding row (`IndexedDataset.sampled_id_outside`). A component not preprocessed yet is
    left out: `build_mixture` reports it on the workers."""
    opened = {}
    for name, component in data.components.items():
        if not token_files_exist(component.prefix):
            continue
        try:
            dataset = IndexedDataset(component.prefix)
        except IndexedFormatError as err:
            raise ConfigError(f"data.components.{name}: {err}") from err
        outside = dataset.sampled_id_outside(model.vocab_size)
        if outside is not None:
            position, token = outside
            document = dataset.document_of(dataset.sequence_at(position))
            raise ConfigError(
                f"data.components.{name}: {bin_path(component.prefix)} holds token id {token} "
                f"(document {document}, token {position} of the file), outside "
                f"model.vocab_size={model.vocab_size:,}: the data was tokenized for another "
                "vocabulary; preprocess it again with data.tokenizer, or raise model.vocab_size"
            )
        opened[name] = dataset
    return opened


def validate_validation_split(data: DataConfig, opened: dict[str, IndexedDataset]) -> None:
    """In-loop validation reads the mixture's validation split: once the token files exist
    (`opened`, from `checked_token_files`), some component must have documents there (the
    split's middle weight, rounded per component, can leave it empty on a small corpus)."""
    if len(opened) < len(data.components):
        return  # not all preprocessed yet: build_mixture reports it on the workers
    counts = {}
    for name, dataset in opened.items():
        counts[name] = (len(split_documents(len(dataset), data.split)[1]), len(dataset))
    if not any(validation for validation, _ in counts.values()):
        raise ConfigError(
            f"train.eval_interval: no component has documents in the validation split of "
            f"data.split={data.split!r} ({', '.join(f'{k}: 0 of {n} documents' for k, (_, n) in counts.items())}"
            "): raise the split's middle weight, or set train.eval_interval=0"
        )


def compose_pretrain(conf_dir: str, overrides: list[str]) -> DictConfig:
    """The pretrain config with `overrides`, composed by Hydra as `jobs/pretrain.py` would."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config dir
        return compose(config_name="pretrain", overrides=overrides)
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        return compose(config_name="pretrain", overrides=overrides)


def pretrain_config(cfg: Any) -> PretrainConfig:
    """Typed, validated config from the Hydra `pretrain` config (sections as in conf/pretrain.yaml)."""
    values = to_dict(cfg)
    data_section = values.get("data") or {}
    data = (
        dataclass_from_config(SyntheticDataConfig, data_section, "data")
        if data_section.get("synthetic")
        else data_config(data_section)
    )
    config = PretrainConfig(
        model=dataclass_from_config(NeoXConfig, values.get("model"), "model"),
        parallel=dataclass_from_config(ParallelConfig, values.get("parallel"), "parallel"),
        optim=dataclass_from_config(OptimConfig, values.get("optim"), "optim"),
        train=dataclass_from_config(TrainConfig, values.get("train"), "train"),
        data=data,
        run_dir=str(values.get("run_dir") or "runs/pretrain"),
        run_name=str(values.get("run_name") or "pretrain"),
        checkpoint=dataclass_from_config(CheckpointConfig, values.get("checkpoint"), "checkpoint"),
        storage=dataclass_from_config(StorageConfig, values.get("storage"), "storage"),
        energy=dataclass_from_config(EnergyConfig, values.get("energy"), "energy"),
    )
    validate_layout(config.model, config.parallel)
    if config.train.init_from:  # from the metadata alone, before any weight is read
        check_source(open_source(config.train.init_from, config.storage), config.model)
    if config.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={config.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}: "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if isinstance(config.data, DataConfig):
        validate_vocab(config.model, config.data)
        opened = checked_token_files(config.model, config.data)
        if config.train.eval_interval:
            validate_validation_split(config.data, opened)
    return config
