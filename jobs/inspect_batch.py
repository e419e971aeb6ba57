"""Print the decoded text of one training step's batch. See conf/inspect_batch.yaml."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.data.config import data_config
from neoray.data.inspect import batch_samples, format_batch
from neoray.data.loader import BatchSchedule, train_mixture
from neoray.tokenizer.load import load_tokenizer


@hydra.main(config_path="../conf", config_name="inspect_batch", version_base=None)
def main(cfg: DictConfig) -> None:
    data = data_config(cfg.data)
    schedule = dataclass_from_config(BatchSchedule, cfg.batch, "batch")
    samples = batch_samples(
        train_mixture(data, schedule), load_tokenizer(data.tokenizer), schedule, cfg.step, cfg.rank
    )
    if cfg.checkpoint:
        print(training_note(cfg.checkpoint, cfg.step))
    print(format_batch(cfg.step, samples))


def training_note(uri: str, step: int) -> str:
    """Whether the run of the checkpoint at `uri` trained on step `step`'s batch: a step
    skipped after a loss spike (or by train.skip_steps) was read but never trained on."""
    from neoray.checkpoint.manifest import checkpoint_from_uri

    _, manifest = checkpoint_from_uri(uri)
    where = f"run {manifest.run_name!r} at its checkpoint of step {manifest.step}"
    if manifest.trained_on(step):
        return f"step {step}: trained on by {where}"
    if step < manifest.step:
        return (
            f"step {step}: skipped by {where} (see skipped_steps in its manifest): never trained on"
        )
    return f"step {step}: not trained on yet by {where}"


if __name__ == "__main__":
    main()
